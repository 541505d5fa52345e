//! Data: rows → conversations → tokens with assistant-only labels → padded or packed batches.

mod common;

use candor::data::batch::{
    tokenize_examples, BatchMode, Batcher, DataCursor, TokenizeOptions, TokenizedExample, Truncation,
};
use candor::data::falsereject::{
    read_rows, rows_to_examples, ConversationOptions, Example, OnBadRow, SkipReport,
};
use candor::data::template::Message;
use candor::model::{load_model, LoadOptions};
use common::*;
use rand::{Rng, SeedableRng};

fn smollm2_tokenizer() -> candor::model::tokenizer::ChatTokenizer {
    let path = format!("{}/models/SmolLM2-135M-Instruct.Q4_1.gguf", env!("CARGO_MANIFEST_DIR"));
    assert!(std::path::Path::new(&path).is_file(), "{path} is missing: run scripts/fetch-smollm2.sh");
    let mut loaded = load_model(&path, &LoadOptions::cpu()).unwrap();
    loaded.tokenizer.take().unwrap()
}

fn opts(max_seq_len: usize) -> TokenizeOptions {
    TokenizeOptions {
        max_seq_len,
        truncation: Truncation::Drop,
        on_bad_row: OnBadRow::Error,
        template_vars: serde_json::Value::Null,
    }
}

fn example(msgs: &[(&str, &str)]) -> Example {
    Example {
        messages: msgs.iter().map(|(r, c)| Message::new(r, c)).collect(),
        category: None,
        origin: "t:1".into(),
    }
}

#[test]
fn only_assistant_tokens_and_their_end_of_turn_are_trained() {
    let tok = smollm2_tokenizer();
    let ex = example(&[
        ("user", "How do I kill a process?"),
        ("assistant", "Use `kill 1234`."),
        ("user", "Thanks"),
        ("assistant", "You're welcome."),
    ]);
    let (out, report) = tokenize_examples(&[ex], &tok, &opts(512)).unwrap();
    assert_eq!(report.kept, 1);
    let t = &out[0];
    // the trained tokens, decoded run by run
    let mut runs: Vec<String> = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (id, &trained) in t.input_ids.iter().zip(&t.trained) {
        if trained {
            cur.push(*id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).unwrap());
    }
    assert_eq!(runs, ["Use `kill 1234`.<|im_end|>", "You're welcome.<|im_end|>"]);
    // the end-of-turn token is a target: the model learns to stop
    let im_end = tok.token_id("<|im_end|>").unwrap() as i64;
    assert_eq!(t.targets().filter(|&x| x == im_end).count(), 2);
    // no BOS doubling: the text starts with the template's first token, once
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(t.input_ids[0], im_start);
    assert_ne!(t.input_ids[1], im_start);
}

#[test]
fn truncation_drop_right_and_empty_masks() {
    let tok = smollm2_tokenizer();
    let long = example(&[
        ("user", "Tell me about kill signals."),
        ("assistant", &"SIGTERM asks politely. ".repeat(40)),
    ]);
    let (out, r) = tokenize_examples(std::slice::from_ref(&long), &tok, &opts(64)).unwrap();
    assert!(out.is_empty() && r.dropped_too_long == 1);

    let right = TokenizeOptions { truncation: Truncation::Right, ..opts(64) };
    let (out, r) = tokenize_examples(std::slice::from_ref(&long), &tok, &right).unwrap();
    assert_eq!((out[0].len(), r.truncated), (64, 1));
    assert!(out[0].num_trained() > 0);

    // truncated before the answer starts: nothing to train on → error, or skipped with a count
    let tiny = TokenizeOptions { truncation: Truncation::Right, ..opts(12) };
    let err = tokenize_examples(std::slice::from_ref(&long), &tok, &tiny).unwrap_err().to_string();
    assert!(err.contains("t:1") && err.contains("no assistant token"), "{err}");
    let skip = TokenizeOptions { on_bad_row: OnBadRow::Skip, ..tiny };
    let (out, r) = tokenize_examples(&[long], &tok, &skip).unwrap();
    assert!(out.is_empty());
    assert_eq!(r.skipped.count, 1);
}

fn random_examples(n: usize, vocab: u32, seed: u64) -> Vec<TokenizedExample> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(3..20);
            let prompt = rng.random_range(1..len - 1);
            TokenizedExample {
                input_ids: (0..len).map(|_| rng.random_range(3..vocab)).collect(),
                trained: (0..len).map(|t| t >= prompt).collect(),
                category: None,
                origin: format!("ex{i}"),
                truncated: false,
            }
        })
        .collect()
}

#[test]
fn packed_loss_equals_the_loss_of_each_example_alone() {
    let loaded = tiny_with_adapter("llama");
    let m = &loaded.model;
    let examples = random_examples(9, m.config.vocab_size as u32, 3);
    let packed = Batcher::new(examples.clone(), BatchMode::Packed, 2, 40, 7, 0).unwrap();
    let mut total_packed = 0.0f64;
    let mut tokens_packed = 0;
    for rows in packed.epoch_plan(0) {
        let b = packed.batch(&rows);
        assert!(rows.iter().any(|r| r.len() > 1) || rows.len() == 1);
        let (loss, n) = m.loss_sum(&m.hidden_states(&b, None, false).unwrap(), &b.targets).unwrap();
        total_packed += loss.to_scalar::<f32>().unwrap() as f64;
        tokens_packed += n;
    }
    let single = Batcher::new(examples.clone(), BatchMode::Padded, 1, 40, 7, 0).unwrap();
    let mut total_alone = 0.0f64;
    let mut tokens_alone = 0;
    for i in 0..examples.len() {
        let b = single.batch(&[vec![i]]);
        let (loss, n) = m.loss_sum(&m.hidden_states(&b, None, false).unwrap(), &b.targets).unwrap();
        total_alone += loss.to_scalar::<f32>().unwrap() as f64;
        tokens_alone += n;
    }
    assert_eq!(tokens_packed, tokens_alone);
    assert!(
        (total_packed - total_alone).abs() / total_alone < 1e-5,
        "packed {total_packed} vs alone {total_alone}"
    );
}

#[test]
fn epoch_plans_cover_every_example_once_and_are_seeded() {
    let examples = random_examples(103, 200, 1);
    for mode in [BatchMode::Padded, BatchMode::Packed] {
        let b = Batcher::new(examples.clone(), mode, 4, 48, 11, 0).unwrap();
        let plan = b.epoch_plan(0);
        let mut seen: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>(), "{mode:?}");
        assert_eq!(plan, b.epoch_plan(0), "same seed and epoch, same plan");
        assert_ne!(plan, b.epoch_plan(1), "a new epoch reshuffles");
        for rows in &plan {
            let batch = b.batch(rows);
            assert!(batch.seq_len <= 48 && batch.batch <= 4);
            if mode == BatchMode::Packed {
                assert_eq!(batch.seq_len, 48);
            }
        }
        // resuming from a cursor gives exactly the remaining batches
        let all: Vec<_> = b.iter_from(DataCursor { epoch: 0, batch_in_epoch: 0 }).collect();
        let tail: Vec<_> = b.iter_from(DataCursor { epoch: 0, batch_in_epoch: 3 }).collect();
        assert_eq!(&all[3..], &tail[..]);
        assert_eq!(tail.last().unwrap().0, DataCursor { epoch: 0, batch_in_epoch: plan.len() });
    }
    let other_seed = Batcher::new(examples, BatchMode::Padded, 4, 48, 12, 0).unwrap();
    assert_ne!(
        other_seed.epoch_plan(0),
        Batcher::new(random_examples(103, 200, 1), BatchMode::Padded, 4, 48, 11, 0).unwrap().epoch_plan(0)
    );
}

#[test]
fn padded_batches_are_bucketed_by_length() {
    let examples = random_examples(400, 200, 2);
    let b = Batcher::new(examples, BatchMode::Padded, 8, 64, 0, 0).unwrap();
    let plan = b.epoch_plan(0);
    let real: usize =
        plan.iter().map(|rows| b.batch(rows).attention_mask.iter().filter(|&&m| m == 1).count()).sum();
    let padded: usize = plan.iter().map(|rows| b.batch(rows).attention_mask.len()).sum();
    // random lengths 3..20 padded without bucketing waste ~40%; bucketing keeps it small
    let padding_share = (padded - real) as f64 / padded as f64;
    assert!(padding_share < 0.1, "padding share {padding_share}");
}

#[test]
fn reading_files_reports_file_and_line() {
    let dir = scratch("rows");
    let p = dir.join("train.jsonl");
    std::fs::write(&p, "{\"prompt\": \"a\", \"instruct_response\": \"b\"}\n\n{\"prompt\": \"c\"\n").unwrap();
    let err = read_rows(&p).err().unwrap().to_string();
    assert!(err.contains("train.jsonl:3: malformed JSON"), "{err}");

    std::fs::write(&p, "{\"prompt\": \"a\", \"instruct_response\": \"b\"}\n{\"category\": 3}\n").unwrap();
    let rows = read_rows(&p).unwrap();
    let err =
        rows_to_examples(rows, &ConversationOptions::default(), OnBadRow::Error, &mut SkipReport::default())
            .unwrap_err()
            .to_string();
    assert!(err.ends_with("train.jsonl:2: missing field \"prompt\""), "{err}");
    let mut skipped = SkipReport::default();
    let ok = rows_to_examples(
        read_rows(&p).unwrap(),
        &ConversationOptions::default(),
        OnBadRow::Skip,
        &mut skipped,
    )
    .unwrap();
    assert_eq!((ok.len(), skipped.count), (1, 1));
    assert!(skipped.first[0].contains("train.jsonl:2"));

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert!(read_rows(&empty).err().unwrap().to_string().contains("empty"));

    // the real FalseReject test split: a JSON array of 1,187 rows without responses (in ../shared/data on
    // our machines; skipped where it is absent)
    let test_split =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/falsereject_test.json");
    if !test_split.is_file() {
        eprintln!("skipping the real test split: {} not present", test_split.display());
        return;
    }
    let rows = read_rows(&test_split).unwrap();
    assert_eq!(rows.len(), 1187);
    let err =
        rows_to_examples(rows, &ConversationOptions::default(), OnBadRow::Error, &mut SkipReport::default())
            .unwrap_err()
            .to_string();
    assert!(err.contains("falsereject_test.json[0]") && err.contains("instruct_response"), "{err}");
}

fn smollm2_path() -> String {
    format!("{}/models/SmolLM2-135M-Instruct.Q4_1.gguf", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn data_inspect_and_stats_commands() {
    let dir = scratch("data-cli");
    let p = dir.join("train.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"How do I kill a stuck job?\", \"category_text\": \"Others\", \"instruct_response\": \"Run `kill 42`.\"}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n",
    )
    .unwrap();
    let (code, out, err) = candor(&["data", "inspect", p.to_str().unwrap(), "--model", &smollm2_path()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("<|im_start|>assistant\n[[Run `kill 42`.<|im_end|>]]"), "{out}");
    let (code, out, err) = candor(&["data", "stats", p.to_str().unwrap(), "--model", &smollm2_path()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 in, 2 kept") && out.contains("carry loss") && out.contains("Others"), "{out}");

    // bad rows: one line naming file, line and field; or a count with --on-bad-row skip
    std::fs::write(
        &p,
        "{\"prompt\": \"a\", \"instruct_response\": \"b\"}\n{\"prompt\": 17, \"instruct_response\": \"b\"}\n",
    )
    .unwrap();
    let (code, _, err) = candor(&["data", "stats", p.to_str().unwrap(), "--model", &smollm2_path()], &[]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("train.jsonl:2: field \"prompt\" must be a string"), "{err}");
    let (code, out, err) = candor(
        &["data", "stats", p.to_str().unwrap(), "--model", &smollm2_path(), "--on-bad-row", "skip"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bad rows skipped: 1") && out.contains("train.jsonl:2"), "{out}");
}

#[test]
fn hf_dataset_sources_resolve_through_the_hub_cache() {
    use candor::data::falsereject::resolve_source;
    use candor::hub::HubOptions;
    let cache = scratch("hf-datasets").join("hub");
    let repo = cache.join("datasets--AmazonScience--FalseReject");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let train = repo.join("snapshots").join(commit).join("train.jsonl");
    std::fs::write(&train, "{\"prompt\": \"p\", \"instruct_response\": \"r\"}\n").unwrap();
    let hub = HubOptions { cache_dir: cache.clone(), offline: true, revision: "main".into() };
    let files = resolve_source("hf://datasets/AmazonScience/FalseReject/train.jsonl", &hub).unwrap();
    assert_eq!(files, vec![train]);
    let err =
        resolve_source("hf://datasets/AmazonScience/FalseReject/test.jsonl", &hub).unwrap_err().to_string();
    assert!(
        err.contains("datasets/AmazonScience/FalseReject")
            && err.contains("test.jsonl")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let err = resolve_source("hf://datasets/AmazonScience", &hub).unwrap_err().to_string();
    assert!(err.contains("expected hf://datasets/ORG/NAME/FILE"), "{err}");
}
