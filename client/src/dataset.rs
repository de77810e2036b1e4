//! Training-data files for screening: JSONL samples in, ranked JSONL/CSV and an SVG histogram out.

use crate::pb;
use anyhow::{Context, Result, bail};

/// One JSONL line of a conversation file: its id, the messages before the response, and the
/// response when there is one.
pub struct Record {
    pub id: String,
    pub messages: Vec<pb::ChatMessage>,
    pub response: Option<String>,
}

/// Reads one JSONL line. Accepted shapes: `{"prompt": "user text"}` (optionally with "system"),
/// `{"messages": [...]}`, either with a "response", or a chat transcript whose last assistant
/// message is the response. "id" is optional (default: the line number).
pub fn record_from_json(line: &str, line_no: usize) -> Result<Record> {
    let v: serde_json::Value = serde_json::from_str(line).context("not JSON")?;
    let id = match &v["id"] {
        serde_json::Value::Null => line_no.to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let text = |k: &str| v[k].as_str().map(str::to_string);
    let mut messages: Vec<pb::ChatMessage> = match v["messages"].as_array() {
        Some(ms) => ms
            .iter()
            .map(|m| {
                let role = m["role"].as_str().context("message without role")?;
                let content = m["content"].as_str().context("message without content")?;
                Ok(crate::message(role, content))
            })
            .collect::<Result<_>>()?,
        None => {
            let mut ms = Vec::new();
            if let Some(s) = text("system") {
                ms.push(crate::message("system", &s));
            }
            ms.push(crate::message("user", &text("prompt").context("needs \"prompt\" or \"messages\"")?));
            ms
        }
    };
    let response = match text("response") {
        Some(r) => Some(r),
        None if messages.last().is_some_and(|m| m.role == "assistant") => messages.pop().map(|m| m.content),
        None => None,
    };
    if messages.is_empty() {
        bail!("no prompt messages before the response");
    }
    Ok(Record { id, messages, response })
}

/// One JSONL line as a screening sample: a record that has a response.
pub fn sample_from_json(line: &str, line_no: usize) -> Result<pb::ScreenSample> {
    let r = record_from_json(line, line_no)?;
    let response = r.response.context("needs \"response\" or a final assistant message")?;
    Ok(pb::ScreenSample { id: r.id, prompt: Some(pb::Conversation { messages: r.messages }), response })
}

/// A CSV field, quoted when it needs to be.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// A histogram of `values` as a standalone SVG document.
pub fn histogram_svg(values: &[f32], bins: usize, title: &str) -> String {
    let (w, h, margin) = (640.0f32, 360.0f32, 48.0f32);
    let bins = bins.max(1);
    let (lo, hi) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if values.is_empty() {
        (0.0, 1.0)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    let mut counts = vec![0usize; bins];
    for &v in values {
        let i = (((v - lo) / (hi - lo)) * bins as f32) as usize;
        counts[i.min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f32;
    let (pw, ph) = (w - 2.0 * margin, h - 2.0 * margin);
    let bw = pw / bins as f32;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        xml_escape(title)
    );
    for (i, &c) in counts.iter().enumerate() {
        let bh = c as f32 / top * ph;
        svg += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a78b5\"><title>{}</title></rect>\n",
            margin + i as f32 * bw + 0.5,
            margin + ph - bh,
            (bw - 1.0).max(0.5),
            bh,
            c
        );
    }
    let axis_y = margin + ph;
    svg += &format!(
        "<line x1=\"{margin}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>\n\
         <text x=\"{margin}\" y=\"{}\" text-anchor=\"start\">{lo:.2}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{hi:.2}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">projection difference ({} samples)</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n</svg>\n",
        margin + pw,
        axis_y + 16.0,
        margin + pw,
        axis_y + 16.0,
        w / 2.0,
        axis_y + 34.0,
        values.len(),
        margin - 4.0,
        margin + 4.0,
        top as usize
    );
    svg
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_in_every_accepted_shape() {
        let s = sample_from_json(r#"{"prompt": "Hi?", "system": "Be brief.", "response": "Hello."}"#, 3).unwrap();
        assert_eq!(s.id, "3");
        let roles: Vec<_> = s.prompt.unwrap().messages.into_iter().map(|m| m.role).collect();
        assert_eq!(roles, ["system", "user"]);
        let s = sample_from_json(
            r#"{"id": 7, "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}"#,
            1,
        )
        .unwrap();
        assert_eq!((s.id.as_str(), s.response.as_str()), ("7", "A"));
        assert_eq!(s.prompt.unwrap().messages.len(), 1);
        for bad in [r#"{"response": "x"}"#, r#"{"prompt": "q"}"#, "nope", r#"{"messages": [], "response": "r"}"#] {
            assert!(sample_from_json(bad, 1).is_err(), "{bad}");
        }
        // Without a response a line is still a conversation to monitor.
        let r = record_from_json(r#"{"prompt": "q"}"#, 4).unwrap();
        assert_eq!((r.id.as_str(), r.messages.len(), r.response), ("4", 1, None));
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\"\n"), "\"say \"\"hi\"\"\n\"");
    }

    #[test]
    fn the_histogram_has_one_bar_per_bin_with_counts() {
        let svg = histogram_svg(&[0.0, 0.1, 0.9, 1.0, 1.0], 4, "a < b");
        assert_eq!(svg.matches("<rect x=").count(), 4);
        assert!(svg.contains("<title>2</title>") && svg.contains("<title>3</title>"));
        assert!(svg.contains("a &lt; b") && svg.contains("(5 samples)"));
        assert!(histogram_svg(&[], 3, "empty").contains("(0 samples)"));
    }
}
