//! On-disk persona vector store: one safetensors file per vector, tensor `vector` of shape
//! `[n_layers + 1, d_model]` (f32) plus string metadata. Writes go to a temporary file that is
//! renamed into place, so a vector is either fully stored or not at all.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::calibration::LayerCalibration;
use super::evaluation::SteeringRecommendation;

const TENSOR: &str = "vector";
const EXT: &str = "safetensors";
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid vector name `{0}`: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'")]
    InvalidName(String),
    #[error("vector `{0}` not found")]
    NotFound(String),
    #[error("vector `{0}` already exists (set overwrite to replace it)")]
    Exists(String),
    #[error("malformed vector: {0}")]
    Malformed(String),
    #[error("vector store I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// How a vector's activations were averaged when it was extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VectorKind {
    #[default]
    ResponseAvg,
    PromptAvg,
    PromptLast,
}

impl VectorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ResponseAvg => "response_avg",
            Self::PromptAvg => "prompt_avg",
            Self::PromptLast => "prompt_last",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::ResponseAvg, Self::PromptAvg, Self::PromptLast].into_iter().find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VectorMeta {
    pub name: String,
    pub model: String,
    pub trait_name: String,
    pub kind: VectorKind,
    pub created_unix: i64,
    pub description: String,
    pub n_rows: usize,
    pub d_model: usize,
    /// Layer whose projections best separated held-out positive and negative rollouts.
    pub recommended_layer: Option<usize>,
    /// Separation per residual layer (empty when the vector was not extracted here).
    pub layer_scores: Vec<LayerScore>,
    /// Where the helpful and trait rollouts project, per layer (empty: raw scores only).
    pub calibration: Vec<LayerCalibration>,
    /// The steering layer and coefficient chosen by an evaluation.
    pub steering: Option<SteeringRecommendation>,
    /// Set when TransferVector carried the vector here from another model.
    pub transferred_from: Option<TransferredFrom>,
}

/// Where a transferred vector came from, and how well the map between the two models fits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransferredFrom {
    pub model: String,
    pub vector: String,
    pub source_layer: usize,
    pub target_layer: usize,
    /// `ridge` or `procrustes`.
    pub method: String,
    /// Held-out R² of the map between the two layers.
    pub r2: f32,
    pub samples: usize,
}

impl VectorMeta {
    /// The calibration of one layer, when the vector has one there.
    pub fn calibration_at(&self, layer: usize) -> Option<&LayerCalibration> {
        self.calibration.iter().find(|c| c.layer == layer)
    }
}

/// How well projections at one layer separate positive from negative rollouts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerScore {
    pub layer: usize,
    pub cohens_d: f32,
    pub auroc: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredVector {
    pub meta: VectorMeta,
    /// Row-major `[n_rows, d_model]`.
    pub values: Vec<f32>,
}

impl StoredVector {
    pub fn row(&self, layer: usize) -> Option<&[f32]> {
        let d = self.meta.d_model;
        self.values.get(layer * d..(layer + 1) * d)
    }

    pub fn row_norms(&self) -> Vec<f32> {
        self.values.chunks(self.meta.d_model.max(1)).map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()).collect()
    }
}

pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(StoreError::InvalidName(name.to_string())) }
}

/// Checks shape and values; returns the vector ready to store.
pub fn check_values(meta: &VectorMeta, values: &[f32]) -> Result<(), StoreError> {
    let want = meta.n_rows * meta.d_model;
    if meta.n_rows == 0 || meta.d_model == 0 {
        return Err(StoreError::Malformed("empty shape".into()));
    }
    if values.len() != want {
        return Err(StoreError::Malformed(format!(
            "expected {} rows x {} = {want} values, got {}",
            meta.n_rows,
            meta.d_model,
            values.len()
        )));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(StoreError::Malformed(format!("value {i} is not finite")));
    }
    Ok(())
}

/// A directory of vector files shared by every replica that mounts it, with an in-memory index.
///
/// Each indexed vector keeps the [`Stamp`] of the file it was read from, and every use checks the
/// file's stamp first (one `stat`, no read): a put, overwrite or delete through another replica
/// is seen on the next use of that name, and the file is read again only when it changed.
pub struct VectorStore {
    dir: PathBuf,
    vectors: RwLock<BTreeMap<String, Entry>>,
}

struct Entry {
    vector: Arc<StoredVector>,
    stamp: Stamp,
}

/// What tells one version of a vector file from another. A put writes a new file and renames
/// it over the old one, so the inode changes with every put even where the file system's clock
/// is too coarse for the modification time to differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Self { modified: meta.modified().ok(), len: meta.len(), inode }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// How old a temporary file must be before `open` treats it as left by a killed writer. A put
/// writes, syncs and renames within milliseconds; younger files may belong to a replica sharing
/// the directory that is writing right now.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(600);

/// A put's temporary file (`.NAME.PID.NANOS.tmp`) older than [`STALE_TMP`]: what a writer killed
/// between create and rename leaves. Complete vector files never match.
fn is_stale_partial_write(path: &Path) -> bool {
    let Some(file) = path.file_name().and_then(|n| n.to_str()) else { return false };
    if !(file.starts_with('.') && file.ends_with(".tmp")) {
        return false;
    }
    let age = std::fs::metadata(path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
    age.is_some_and(|a| a >= STALE_TMP)
}

impl VectorStore {
    /// Opens (creating if needed) a store directory and indexes the vectors in it. Files that
    /// cannot be read are reported and left untouched; temporary files of writes interrupted
    /// long ago (a kill between write and rename) are removed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            if is_stale_partial_write(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(path = %path.display(), "removed an interrupted write's temporary file"),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale temporary file")
                    }
                }
            }
        }
        let store = Self { dir: dir.to_path_buf(), vectors: RwLock::new(BTreeMap::new()) };
        store.rescan()?;
        tracing::info!(dir = %dir.display(), count = store.read().len(), "vector store opened");
        Ok(store)
    }

    /// Brings the index in line with the directory: new and changed files are read, vanished
    /// ones dropped, unchanged ones kept without reading them.
    fn rescan(&self) -> Result<(), StoreError> {
        let mut seen = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let Some(name) = path.file_stem().and_then(|n| n.to_str()) else { continue };
            if path.extension().is_none_or(|e| e != EXT) || validate_name(name).is_err() {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            seen.insert(name.to_string(), Stamp::of(&meta));
        }
        let stale: Vec<(String, Stamp)> = {
            let map = self.read();
            seen.iter()
                .filter(|(n, s)| map.get(*n).is_none_or(|e| e.stamp != **s))
                .map(|(n, s)| (n.clone(), *s))
                .collect()
        };
        let mut fresh = Vec::new();
        for (name, stamp) in stale {
            let path = self.path_of(&name);
            match read_file(&path) {
                Ok(v) => fresh.push((name, Entry { vector: Arc::new(v), stamp })),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping unreadable vector file"),
            }
        }
        let mut map = self.vectors.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, _| seen.contains_key(name));
        map.extend(fresh);
        Ok(())
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.{EXT}"))
    }

    /// A vector by name, as its file is now: one `stat` tells whether the indexed copy is
    /// current; a file another replica wrote, replaced or deleted is read or dropped here.
    pub fn get(&self, name: &str) -> Result<Arc<StoredVector>, StoreError> {
        validate_name(name)?;
        let path = self.path_of(name);
        let stamp = match std::fs::metadata(&path) {
            Ok(m) => Stamp::of(&m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.vectors.write().unwrap_or_else(|p| p.into_inner()).remove(name);
                return Err(StoreError::NotFound(name.to_string()));
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        if let Some(e) = self.read().get(name)
            && e.stamp == stamp
        {
            return Ok(e.vector.clone());
        }
        // Stamped before reading: if the file is replaced in between, the next use sees a newer
        // stamp and reads again.
        let v = Arc::new(read_file(&path)?);
        let mut map = self.vectors.write().unwrap_or_else(|p| p.into_inner());
        map.insert(name.to_string(), Entry { vector: v.clone(), stamp });
        Ok(v)
    }

    /// The vectors in the directory now (optionally those of one model).
    pub fn list(&self, model: Option<&str>) -> Vec<Arc<StoredVector>> {
        if let Err(e) = self.rescan() {
            tracing::warn!(error = %e, "cannot rescan the vector directory; listing the last index");
        }
        self.read().values().map(|e| &e.vector).filter(|v| model.is_none_or(|m| v.meta.model == m)).cloned().collect()
    }

    /// Validates and stores a vector durably, then makes it visible.
    pub fn put(&self, vector: StoredVector, overwrite: bool) -> Result<Arc<StoredVector>, StoreError> {
        validate_name(&vector.meta.name)?;
        check_values(&vector.meta, &vector.values)?;
        let name = vector.meta.name.clone();
        // Hold the write lock across the file write so two puts of one name in this process
        // cannot interleave. The file decides existence: another replica may have written it.
        let mut map = self.vectors.write().unwrap_or_else(|p| p.into_inner());
        let target = self.path_of(&name);
        if !overwrite && target.exists() {
            return Err(StoreError::Exists(name));
        }
        let bytes = encode(&vector)?;
        // Unique across processes and hosts sharing the directory (container pids repeat).
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = self.dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
        let write = || -> std::io::Result<Stamp> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &target)?;
            sync_dir(&self.dir);
            Ok(Stamp::of(&std::fs::metadata(&target)?))
        };
        let stamp = match write() {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(StoreError::Io { path: target, source: e });
            }
        };
        let v = Arc::new(vector);
        map.insert(name, Entry { vector: v.clone(), stamp });
        Ok(v)
    }

    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        validate_name(name)?;
        let mut map = self.vectors.write().unwrap_or_else(|p| p.into_inner());
        let path = self.path_of(name);
        let removed = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        map.remove(name);
        if !removed {
            return Err(StoreError::NotFound(name.to_string()));
        }
        sync_dir(&self.dir);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.vectors.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes a rename or unlink in `dir` durable (the directory entry, not only the file's data).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the vector directory");
    }
}

pub fn encode(v: &StoredVector) -> Result<Vec<u8>, StoreError> {
    let m = &v.meta;
    let meta: HashMap<String, String> = [
        ("name", m.name.clone()),
        ("model", m.model.clone()),
        ("trait", m.trait_name.clone()),
        ("kind", m.kind.as_str().to_string()),
        ("created_unix", m.created_unix.to_string()),
        ("description", m.description.clone()),
        ("format", "persona-steer/v1".to_string()),
    ]
    .into_iter()
    .chain(m.recommended_layer.map(|l| ("recommended_layer", l.to_string())))
    .chain(
        (!m.layer_scores.is_empty())
            .then(|| ("layer_scores", serde_json::to_string(&m.layer_scores).unwrap_or_default())),
    )
    .chain(
        (!m.calibration.is_empty()).then(|| ("calibration", serde_json::to_string(&m.calibration).unwrap_or_default())),
    )
    .chain(m.steering.as_ref().map(|s| ("steering", serde_json::to_string(s).unwrap_or_default())))
    .chain(m.transferred_from.as_ref().map(|t| ("transferred_from", serde_json::to_string(t).unwrap_or_default())))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes: Vec<u8> = v.values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![m.n_rows, m.d_model], &bytes)
        .map_err(|e| StoreError::Malformed(e.to_string()))?;
    safetensors::serialize([(TENSOR, view)], Some(meta)).map_err(|e| StoreError::Malformed(e.to_string()))
}

/// Reads a vector file; the name is the file stem.
pub fn read_file(path: &Path) -> Result<StoredVector, StoreError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    decode(&name, &bytes)
}

pub fn decode(name: &str, bytes: &[u8]) -> Result<StoredVector, StoreError> {
    let bad = |e: String| StoreError::Malformed(format!("{name}: {e}"));
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let t = st.tensor(TENSOR).map_err(|e| bad(e.to_string()))?;
    if t.dtype() != safetensors::Dtype::F32 {
        return Err(bad(format!("tensor `{TENSOR}` is {:?}, expected F32", t.dtype())));
    }
    let [n_rows, d_model] = t.shape() else {
        return Err(bad(format!("tensor `{TENSOR}` has shape {:?}, expected [n_layers+1, d_model]", t.shape())));
    };
    let values: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let md = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| md.get(k).cloned().unwrap_or_default();
    let meta = VectorMeta {
        name: name.to_string(),
        model: get("model"),
        trait_name: get("trait"),
        kind: VectorKind::parse(&get("kind")).unwrap_or_default(),
        created_unix: get("created_unix").parse().unwrap_or(0),
        description: get("description"),
        n_rows: *n_rows,
        d_model: *d_model,
        recommended_layer: get("recommended_layer").parse().ok().filter(|l| l < n_rows),
        layer_scores: serde_json::from_str(&get("layer_scores")).unwrap_or_default(),
        calibration: serde_json::from_str(&get("calibration")).unwrap_or_default(),
        steering: serde_json::from_str::<SteeringRecommendation>(&get("steering")).ok().filter(|s| s.layer < *n_rows),
        transferred_from: serde_json::from_str(&get("transferred_from")).ok(),
    };
    check_values(&meta, &values).map_err(|e| bad(e.to_string()))?;
    Ok(StoredVector { meta, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str, fill: f32) -> StoredVector {
        StoredVector {
            meta: VectorMeta {
                name: name.into(),
                model: "m".into(),
                trait_name: "evil".into(),
                kind: VectorKind::PromptLast,
                created_unix: 1_700_000_000,
                description: "test".into(),
                n_rows: 3,
                d_model: 4,
                recommended_layer: Some(2),
                layer_scores: vec![LayerScore { layer: 2, cohens_d: 1.5, auroc: 0.875 }],
                calibration: vec![LayerCalibration {
                    layer: 2,
                    response: crate::steering::calibration::Scale::from_samples(&[4.0, 6.0], &[1.0]).unwrap(),
                    prompt_last: crate::steering::calibration::Scale::from_samples(&[3.0], &[-1.0]).unwrap(),
                }],
                steering: Some(SteeringRecommendation {
                    layer: 1,
                    coefficient: 2.5,
                    trait_score: 61.0,
                    unsteered_trait_score: 3.0,
                    coherence: 88.0,
                    unsteered_coherence: 99.0,
                    scorer: "offline".into(),
                    evaluated_unix: 1_700_000_100,
                    layers: vec![crate::steering::evaluation::LayerRecommendation {
                        layer: 1,
                        coefficient: 2.5,
                        trait_score: 61.0,
                        coherence: 88.0,
                    }],
                    grid: vec![crate::steering::evaluation::CellScore {
                        layer: 1,
                        coefficient: 2.5,
                        trait_score: 61.0,
                        coherence: 88.0,
                    }],
                    coherence_threshold: 79.2,
                }),
                transferred_from: Some(TransferredFrom {
                    model: "source-model".into(),
                    vector: "evil".into(),
                    source_layer: 15,
                    target_layer: 2,
                    method: "ridge".into(),
                    r2: 0.61,
                    samples: 3000,
                }),
            },
            values: (0..12).map(|i| i as f32 * fill).collect(),
        }
    }

    /// A put killed between create and rename (kill -9) leaves `.NAME.PID.NANOS.tmp` behind;
    /// the next start removes it once it is older than any live write, and touches nothing else:
    /// complete vectors, fresh temporary files (a replica writing now) and unrelated files stay.
    #[test]
    fn open_removes_stale_partial_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        VectorStore::open(dir.path()).unwrap().put(vector("kept", 1.0), false).unwrap();
        let old = std::time::SystemTime::now() - STALE_TMP - std::time::Duration::from_secs(60);
        let write = |name: &str, modified: std::time::SystemTime| {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.set_modified(modified).unwrap();
        };
        write(".evil.4242.1700000000000000000.tmp", old);
        write(".fresh.4243.1700000000000000001.tmp", std::time::SystemTime::now());
        write("notes.tmp", old);
        let store = VectorStore::open(dir.path()).unwrap();
        let left: std::collections::BTreeSet<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let want: std::collections::BTreeSet<String> =
            ["kept.safetensors", ".fresh.4243.1700000000000000001.tmp", "notes.tmp"].map(String::from).into();
        assert_eq!(left, want);
        assert_eq!(store.get("kept").unwrap().values, vector("kept", 1.0).values);
    }

    #[test]
    fn round_trips_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = VectorStore::open(dir.path()).unwrap();
        store.put(vector("evil.v1", 0.5), false).unwrap();
        drop(store);
        let store = VectorStore::open(dir.path()).unwrap();
        let v = store.get("evil.v1").unwrap();
        assert_eq!(*v, vector("evil.v1", 0.5));
        assert_eq!(v.row(2).unwrap(), &[4.0, 4.5, 5.0, 5.5]);
        assert_eq!(store.list(Some("m")).len(), 1);
        assert!(store.list(Some("other")).is_empty());
    }

    #[test]
    fn vectors_written_by_another_process_are_found_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (VectorStore::open(dir.path()).unwrap(), VectorStore::open(dir.path()).unwrap());
        a.put(vector("shared", 1.5), false).unwrap();
        assert_eq!(*b.get("shared").unwrap(), vector("shared", 1.5));
        assert_eq!(b.list(None).len(), 1);
        assert!(matches!(b.get("absent"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn overwrites_and_deletes_by_another_process_are_seen_on_next_use() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (VectorStore::open(dir.path()).unwrap(), VectorStore::open(dir.path()).unwrap());
        a.put(vector("shared", 1.0), false).unwrap();
        assert_eq!(*b.get("shared").unwrap(), vector("shared", 1.0));
        a.put(vector("shared", 2.0), true).unwrap();
        assert_eq!(*b.get("shared").unwrap(), vector("shared", 2.0), "B reads the overwrite");
        assert!(matches!(b.put(vector("shared", 3.0), false), Err(StoreError::Exists(_))));
        a.delete("shared").unwrap();
        assert!(matches!(b.get("shared"), Err(StoreError::NotFound(_))), "B sees the delete");
        assert!(b.list(None).is_empty());
        assert!(matches!(b.delete("shared"), Err(StoreError::NotFound(_))));
        a.put(vector("later", 4.0), false).unwrap();
        assert_eq!(b.list(None).iter().map(|v| v.meta.name.as_str()).collect::<Vec<_>>(), ["later"]);
        b.delete("later").unwrap();
        assert!(matches!(a.get("later"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn unchanged_files_are_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = VectorStore::open(dir.path()).unwrap();
        a.put(vector("kept", 1.0), false).unwrap();
        let first = a.get("kept").unwrap();
        assert!(Arc::ptr_eq(&first, &a.get("kept").unwrap()), "same file, same copy");
        assert!(Arc::ptr_eq(&first, &a.list(None)[0]));
    }

    #[test]
    fn rejects_bad_input_without_touching_the_stored_vector() {
        let dir = tempfile::tempdir().unwrap();
        let store = VectorStore::open(dir.path()).unwrap();
        store.put(vector("a", 1.0), false).unwrap();
        assert!(matches!(store.put(vector("a", 2.0), false), Err(StoreError::Exists(_))));
        let mut short = vector("a", 3.0);
        short.values.pop();
        assert!(matches!(store.put(short, true), Err(StoreError::Malformed(_))));
        let mut nan = vector("a", 3.0);
        nan.values[5] = f32::NAN;
        assert!(matches!(store.put(nan, true), Err(StoreError::Malformed(_))));
        for bad in ["", ".hidden", "../x", "a/b", &"x".repeat(200)] {
            assert!(matches!(store.put(vector(bad, 1.0), true), Err(StoreError::InvalidName(_))), "{bad}");
        }
        assert_eq!(*store.get("a").unwrap(), vector("a", 1.0));
        let reopened = VectorStore::open(dir.path()).unwrap();
        assert_eq!(*reopened.get("a").unwrap(), vector("a", 1.0));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
    }

    #[test]
    fn overwrite_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = VectorStore::open(dir.path()).unwrap();
        store.put(vector("a", 1.0), false).unwrap();
        store.put(vector("a", 2.0), true).unwrap();
        assert_eq!(store.get("a").unwrap().values[1], 2.0);
        store.delete("a").unwrap();
        assert!(matches!(store.get("a"), Err(StoreError::NotFound(_))));
        assert!(matches!(store.delete("a"), Err(StoreError::NotFound(_))));
        assert!(VectorStore::open(dir.path()).unwrap().list(None).is_empty());
    }

    #[test]
    fn corrupt_files_are_skipped_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk.safetensors"), b"not a safetensors file").unwrap();
        let store = VectorStore::open(dir.path()).unwrap();
        assert!(store.list(None).is_empty());
        assert!(dir.path().join("junk.safetensors").exists());
        assert!(decode("x", b"\x08\0\0\0\0\0\0\0{}      ").is_err());
    }
}
