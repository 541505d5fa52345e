//! Files from the Hugging Face hub: the local cache first (`HF_HOME`, the standard
//! `models--org--name/snapshots/<rev>/` layout), then the network unless `HF_HUB_OFFLINE=1`.

use std::path::PathBuf;

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{CandorError, Result};

#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub cache directory (`$HF_HOME/hub`, or `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    pub revision: String,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        HubOptions { cache_dir: Cache::from_env().path().clone(), offline, revision: "main".into() }
    }
}

/// One repository on the hub (a model or a dataset).
pub struct HubRepo {
    repo: Repo,
    opts: HubOptions,
}

impl HubRepo {
    pub fn model(id: &str, opts: HubOptions) -> Self {
        let repo = Repo::with_revision(id.to_string(), RepoType::Model, opts.revision.clone());
        HubRepo { repo, opts }
    }

    pub fn dataset(id: &str, opts: HubOptions) -> Self {
        let repo = Repo::with_revision(id.to_string(), RepoType::Dataset, opts.revision.clone());
        HubRepo { repo, opts }
    }

    fn cached(&self, filename: &str) -> Option<PathBuf> {
        Cache::new(self.opts.cache_dir.clone()).repo(self.repo.clone()).get(filename)
    }

    /// A file that must exist: from the cache, else downloaded into it.
    pub fn get(&self, filename: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(filename) {
            return Ok(p);
        }
        let id = self.repo.url();
        let cache = self.opts.cache_dir.display();
        if self.opts.offline {
            return Err(CandorError::msg(format!(
                "{id}: {filename} is not in the hub cache {cache} and HF_HUB_OFFLINE is set"
            )));
        }
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(self.opts.cache_dir.clone()))
            .with_progress(false);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder
            .build()
            .map_err(|e| CandorError::msg(format!("{id}: cannot start the hub client: {e}")))?;
        api.repo(self.repo.clone()).get(filename).map_err(|e| {
            CandorError::msg(format!(
                "{id}: cannot download {filename} ({e}) and the hub cache {cache} has no copy"
            ))
        })
    }

    /// A file that may not exist in the repository.
    pub fn get_optional(&self, filename: &str) -> Option<PathBuf> {
        self.cached(filename).or_else(|| if self.opts.offline { None } else { self.get(filename).ok() })
    }
}

/// Whether `spec` looks like a hub id (`org/name`) rather than a local path.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}
