use crate::model::load_model;

use super::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let opts = args.model.load_options()?;
    let loaded = load_model(&args.model.model, &opts)?;
    let c = &loaded.model.config;
    println!("model          {}", loaded.source);
    println!(
        "architecture   {} ({} layers, hidden {}, intermediate {})",
        c.family.model_type(),
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size
    );
    println!(
        "attention      {} heads, {} kv heads (GQA {}:1), head_dim {}{}{}",
        c.num_attention_heads,
        c.num_key_value_heads,
        c.num_attention_heads / c.num_key_value_heads,
        c.head_dim,
        if c.qkv_bias { ", q/k/v bias" } else { "" },
        if c.qk_norm { ", q/k RMSNorm" } else { "" }
    );
    println!(
        "rope           theta {}, scaling {:?}, max positions {}",
        c.rope_theta, c.rope_scaling, c.max_position_embeddings
    );
    println!(
        "vocabulary     {} tokens, embeddings {}",
        c.vocab_size,
        if c.tie_word_embeddings { "tied" } else { "untied" }
    );
    println!("parameters     {} ({:.1} M)", c.num_parameters(), c.num_parameters() as f64 / 1e6);
    if loaded.model.device().is_cpu() {
        println!("cpu matmul     {}", crate::ops::openblas::describe());
        println!("cpu bf16       {}", crate::ops::amx::describe());
    }
    println!(
        "dtype          {:?} on {:?} (saved as {})",
        loaded.model.dtype(),
        loaded.model.device().location(),
        c.saved_dtype.as_deref().unwrap_or("unknown")
    );
    if loaded.tokenizer.is_none() {
        println!("tokenizer      none (no tokenizer.json)");
    }
    if let Some(t) = &loaded.tokenizer {
        println!("tokenizer      {}", t.tokenizer_source);
        match &t.template {
            Some(tmpl) => println!("chat template  {}", tmpl.source),
            None => println!("chat template  none (base model)"),
        }
        let stops: Vec<String> = t
            .stop_ids
            .iter()
            .map(|&id| format!("{id} {}", t.tokenizer.id_to_token(id).unwrap_or_default()))
            .collect();
        println!("stop tokens    {}", stops.join(", "));
    }
    Ok(())
}
