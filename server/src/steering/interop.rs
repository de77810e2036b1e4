//! Vectors in other programs' formats: llama.cpp / repeng control-vector GGUF (import and export)
//! and persona_vectors' PyTorch `.pt` files (import).
//!
//! Layer mapping: a control vector's `direction.N` is added after block N, which is our residual
//! row N + 1. llama.cpp refuses `direction.0`, so exports carry rows 2..=n_layers only.

use super::store::StoreError;
use candle_core::pickle::{Object, Stack};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use std::io::{Cursor, Read};

/// File formats a vector can be imported from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    Gguf,
    Torch,
}

impl Format {
    /// Recognises a file by its first bytes.
    pub fn detect(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [b'G', b'G', b'U', b'F', ..] => Some(Self::Gguf),
            [b'P', b'K', 3, 4, ..] => Some(Self::Torch),
            [_, _, _, _, _, _, _, _, b'{', ..] => Some(Self::Safetensors),
            _ => None,
        }
    }
}

fn malformed(what: &str) -> impl Fn(candle_core::Error) -> StoreError + '_ {
    move |e| StoreError::Malformed(format!("{what}: {e}"))
}

const GGUF_ARCH: &str = "controlvector";

/// Rows `[n_rows, d_model]` from a control-vector GGUF; rows without a direction are zero.
pub fn import_gguf(bytes: &[u8], n_rows: usize, d_model: usize) -> Result<Vec<f32>, StoreError> {
    let mut cursor = Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cursor).map_err(malformed("GGUF"))?;
    let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
    if arch.as_deref() != Some(GGUF_ARCH) {
        return Err(StoreError::Malformed(format!(
            "GGUF general.architecture is {arch:?}, expected \"{GGUF_ARCH}\" (a control vector)"
        )));
    }
    let mut values = vec![0f32; n_rows * d_model];
    let mut found = 0;
    for name in content.tensor_infos.keys() {
        let Some(n) = name.strip_prefix("direction.") else { continue };
        let n: usize =
            n.parse().map_err(|_| StoreError::Malformed(format!("GGUF tensor `{name}`: bad layer index")))?;
        let row = n + 1;
        if row >= n_rows {
            return Err(StoreError::Malformed(format!(
                "GGUF tensor `{name}` is after block {n}, but the model has {} blocks",
                n_rows - 1
            )));
        }
        let t = content.tensor(&mut cursor, name, &Device::Cpu).map_err(malformed(name))?;
        let t = t.dequantize(&Device::Cpu).map_err(malformed(name))?;
        if t.dims() != [d_model] {
            return Err(StoreError::Malformed(format!(
                "GGUF tensor `{name}` has shape {:?}, the model needs [{d_model}]",
                t.dims()
            )));
        }
        let row_values = t.to_vec1::<f32>().map_err(malformed(name))?;
        values[row * d_model..(row + 1) * d_model].copy_from_slice(&row_values);
        found += 1;
    }
    if found == 0 {
        return Err(StoreError::Malformed("GGUF file has no direction.N tensors".into()));
    }
    Ok(values)
}

/// A control-vector GGUF holding rows 2..=n_layers as `direction.1..`; all-zero rows are left out.
pub fn export_gguf(values: &[f32], n_rows: usize, d_model: usize, model_hint: &str) -> Result<Vec<u8>, StoreError> {
    let mut tensors = Vec::new();
    for row in 2..n_rows {
        let r = &values[row * d_model..(row + 1) * d_model];
        if r.iter().all(|x| *x == 0.0) {
            continue;
        }
        let t = Tensor::from_slice(r, d_model, &Device::Cpu).map_err(malformed("export"))?;
        let q = QTensor::quantize(&t, GgmlDType::F32).map_err(malformed("export"))?;
        tensors.push((format!("direction.{}", row - 1), q));
    }
    let arch = gguf_file::Value::String(GGUF_ARCH.into());
    let hint = gguf_file::Value::String(model_hint.into());
    let count = gguf_file::Value::U32(tensors.len() as u32);
    let metadata =
        [("general.architecture", &arch), ("controlvector.model_hint", &hint), ("controlvector.layer_count", &count)];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &refs).map_err(malformed("export"))?;
    Ok(out.into_inner())
}

/// Rows from a PyTorch file holding one tensor of shape `[n_rows, d_model]` (f32, f16, bf16 or
/// f64), saved bare or as the only tensor of a dict.
pub fn import_torch(bytes: &[u8], n_rows: usize, d_model: usize) -> Result<Vec<f32>, StoreError> {
    let bad = |e: String| StoreError::Malformed(format!("PyTorch file: {e}"));
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| bad(e.to_string()))?;
    let pkl = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.to_string())
        .ok_or_else(|| bad("no data.pkl inside (not a torch.save file?)".into()))?;
    let dir = std::path::PathBuf::from(pkl.trim_end_matches(".pkl"));
    let mut stack = Stack::empty();
    {
        let entry = zip.by_name(&pkl).map_err(|e| bad(e.to_string()))?;
        stack.read_loop(&mut std::io::BufReader::new(entry)).map_err(|e| bad(e.to_string()))?;
    }
    let obj = stack.finalize().map_err(|e| bad(e.to_string()))?;
    let mut infos = Vec::new();
    match obj {
        Object::Dict(items) => {
            for (k, v) in items {
                if let Some(info) = v.into_tensor_info(k, &dir).map_err(|e| bad(e.to_string()))? {
                    infos.push(info);
                }
            }
        }
        obj => {
            infos.extend(obj.into_tensor_info(Object::Unicode("vector".into()), &dir).map_err(|e| bad(e.to_string()))?)
        }
    }
    let info = match infos.len() {
        1 => infos.remove(0),
        0 => return Err(bad("holds no tensor".into())),
        _ => {
            let names: Vec<_> = infos.iter().map(|i| i.name.as_str()).collect();
            return Err(bad(format!("holds {} tensors ({}); expected one", names.len(), names.join(", "))));
        }
    };
    if info.layout.dims() != [n_rows, d_model] {
        return Err(bad(format!("tensor has shape {:?}, the model needs [{n_rows}, {d_model}]", info.layout.dims())));
    }
    if !info.layout.is_contiguous() {
        return Err(bad("tensor is not contiguous".into()));
    }
    if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        return Err(bad(format!("tensor dtype {:?} is not a float type", info.dtype)));
    }
    let mut entry = zip.by_name(&info.path).map_err(|e| bad(format!("{}: {e}", info.path)))?;
    let (skip, len) = (info.layout.start_offset(), n_rows * d_model * info.dtype.size_in_bytes());
    let mut raw = vec![0u8; skip + len];
    entry.read_exact(&mut raw).map_err(|e| bad(format!("tensor data: {e}")))?;
    let t = Tensor::from_raw_buffer(&raw[skip..], info.dtype, &[n_rows * d_model], &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(malformed("PyTorch tensor"))?;
    t.to_vec1::<f32>().map_err(malformed("PyTorch tensor"))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A `torch.save(tensor)` file written by hand: zip with `archive/data.pkl` (pickle protocol 2
    /// calling torch._utils._rebuild_tensor_v2 on a persistent storage) and `archive/data/0`.
    pub fn torch_file(values: &[f32], rows: usize, cols: usize, dict_key: Option<&str>) -> Vec<u8> {
        use std::io::Write;
        let int = |p: &mut Vec<u8>, n: usize| {
            if n < 256 {
                p.extend([b'K', n as u8]);
            } else {
                p.push(b'J');
                p.extend((n as u32).to_le_bytes());
            }
        };
        let text = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend((s.len() as u32).to_le_bytes());
            p.extend(s.as_bytes());
        };
        let mut p = vec![0x80, 2];
        if let Some(k) = dict_key {
            p.extend([b'}', b'(']);
            text(&mut p, k);
        }
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        text(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        text(&mut p, "0");
        text(&mut p, "cpu");
        int(&mut p, values.len());
        p.extend([b't', b'Q']);
        int(&mut p, 0);
        int(&mut p, rows);
        int(&mut p, cols);
        p.push(0x86);
        int(&mut p, cols);
        int(&mut p, 1);
        p.push(0x86);
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend([b't', b'R']);
        if dict_key.is_some() {
            p.push(b'u');
        }
        p.push(b'.');
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).unwrap();
        zip.write_all(&p).unwrap();
        zip.start_file("archive/data/0", opts).unwrap();
        zip.write_all(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).unwrap();
        zip.start_file("archive/version", opts).unwrap();
        zip.write_all(b"3\n").unwrap();
        zip.finish().unwrap().into_inner()
    }

    fn ramp(n_rows: usize, d: usize) -> Vec<f32> {
        (0..n_rows * d).map(|i| (i as f32 * 0.37).sin()).collect()
    }

    #[test]
    fn gguf_round_trip_maps_direction_n_to_row_n_plus_1() {
        let (n_rows, d) = (5, 300);
        let values = ramp(n_rows, d);
        let bytes = export_gguf(&values, n_rows, d, "llama").unwrap();
        assert_eq!(Format::detect(&bytes), Some(Format::Gguf));
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes)).unwrap();
        let mut names: Vec<_> = content.tensor_infos.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["direction.1", "direction.2", "direction.3"]);
        let back = import_gguf(&bytes, n_rows, d).unwrap();
        assert!(back[..2 * d].iter().all(|v| *v == 0.0), "rows 0 and 1 have no control-vector form");
        assert_eq!(&back[2 * d..], &values[2 * d..]);
        // direction.3 of this file is after block 3 = our row 4: a 3-block model has no such row.
        assert!(matches!(import_gguf(&bytes, 4, d), Err(StoreError::Malformed(m)) if m.contains("direction.3")));
        assert!(matches!(import_gguf(&bytes, n_rows, d + 1), Err(StoreError::Malformed(m)) if m.contains("shape")));
    }

    /// Files written by PyTorch 2.15 itself (`torch.save(t)` of f32 sin(0.37 i), and `torch.save({"evil":
    /// t.bfloat16()})`), kept in tests/fixtures.
    #[test]
    fn files_saved_by_pytorch_import() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let want: Vec<f32> = (0..3 * 260).map(|i| (i as f64 * 0.37).sin() as f32).collect();
        let f32_file = std::fs::read(dir.join("ramp_3x260_f32.pt")).unwrap();
        assert_eq!(Format::detect(&f32_file), Some(Format::Torch));
        let got = import_torch(&f32_file, 3, 260).unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-6), "f32 values differ");
        let bf16_file = std::fs::read(dir.join("ramp_3x260_bf16_dict.pt")).unwrap();
        let got = import_torch(&bf16_file, 3, 260).unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-2), "bf16 values differ beyond rounding");
        assert!(import_torch(&f32_file, 31, 576).unwrap_err().to_string().contains("[3, 260]"));
    }

    #[test]
    fn torch_tensors_import_bare_or_in_a_dict() {
        let (n_rows, d) = (3, 260);
        let values = ramp(n_rows, d);
        let bare = torch_file(&values, n_rows, d, None);
        assert_eq!(Format::detect(&bare), Some(Format::Torch));
        assert_eq!(import_torch(&bare, n_rows, d).unwrap(), values);
        let dict = torch_file(&values, n_rows, d, Some("evil"));
        assert_eq!(import_torch(&dict, n_rows, d).unwrap(), values);
        let e = import_torch(&bare, n_rows + 1, d).unwrap_err();
        assert!(e.to_string().contains("shape [3, 260]"), "{e}");
        assert!(import_torch(b"PK\x03\x04 not really", n_rows, d).is_err());
        assert_eq!(Format::detect(b"nonsense"), None);
    }
}
