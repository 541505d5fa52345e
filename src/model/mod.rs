//! The model: config, the one decoder, LoRA, and loading.

pub mod config;
pub mod gguf;
pub mod input;
pub mod load;
pub mod lora;
pub mod tokenizer;
pub mod transformer;

pub use config::{Family, ModelConfig};
pub use input::{TokenBatch, IGNORE_INDEX};
pub use load::{load_model, load_tokenizer, stored_float_dtype, LoadOptions, LoadedModel, ModelSource};
pub use lora::{LoraConfig, LoraLinear};
pub use tokenizer::ChatTokenizer;
pub use transformer::{KvCache, Transformer};
