//! Charts of a steering evaluation and a spectrum: plain SVG and HTML strings built from the
//! results, viewable in any browser without scripts.

use crate::dataset::xml_escape;
use crate::pb;
use std::fmt::Write;

/// Line colours, one per layer (cycled).
const PALETTE: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

fn svg_open(w: f32, h: f32) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    )
}

/// The layers of an evaluation's cells in order, and its coefficients (0 included) in order.
fn grid(r: &pb::EvaluateSteeringResult) -> (Vec<u32>, Vec<f32>) {
    let mut layers: Vec<u32> = r.cells.iter().map(|c| c.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut coefs: Vec<f32> = r.cells.iter().map(|c| c.coefficient).chain([0.0]).collect();
    coefs.sort_by(f32::total_cmp);
    coefs.dedup();
    (layers, coefs)
}

/// A layer's points (coefficient, trait, coherence), the unsteered baseline included at 0.
fn series(r: &pb::EvaluateSteeringResult, layer: u32) -> Vec<(f32, f32, f32)> {
    let mut pts: Vec<(f32, f32, f32)> = r
        .cells
        .iter()
        .filter(|c| c.layer == layer && c.answers > 0)
        .map(|c| (c.coefficient, c.trait_score, c.coherence))
        .chain(r.unsteered.iter().map(|u| (0.0, u.trait_score, u.coherence)))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

/// Trait score (solid, left axis) and coherence (dashed, right axis) against the coefficient,
/// one line pair per layer; the coherence threshold dotted; the recommended point ringed.
pub fn steering_chart_svg(r: &pb::EvaluateSteeringResult) -> String {
    let (layers, coefs) = grid(r);
    let (w, h) = (960.0f32, 600.0f32);
    let (left, right, top, bottom) = (70.0f32, 80.0f32, 70.0f32, 130.0f32);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let (lo, hi) = (coefs.first().copied().unwrap_or(-1.0), coefs.last().copied().unwrap_or(1.0));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let x = |c: f32| left + (c - lo) / span * pw;
    let y = |v: f32| top + ph - v.clamp(0.0, 100.0) / 100.0 * ph;
    let mut s = svg_open(w, h);
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"26\" text-anchor=\"middle\" font-size=\"17\" font-weight=\"bold\">Steering `{}`: trait expression and coherence by coefficient</text>",
        w / 2.0,
        xml_escape(&r.vector)
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"46\" text-anchor=\"middle\" fill=\"#555\">{} questions · scorer: {}</text>",
        w / 2.0,
        r.questions.len(),
        xml_escape(r.scorer.split(';').next().unwrap_or_default())
    );
    // Grid and both y axes (0-100).
    for v in (0..=100).step_by(20) {
        let yy = y(v as f32);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v}</text><text x=\"{}\" y=\"{}\" text-anchor=\"start\">{v}</text>",
            left + pw,
            left - 8.0,
            yy + 4.0,
            left + pw + 8.0,
            yy + 4.0
        );
    }
    for &c in &coefs {
        let xx = x(c);
        let _ = writeln!(
            s,
            "<line x1=\"{xx}\" y1=\"{top}\" x2=\"{xx}\" y2=\"{}\" stroke=\"#f0f0f0\"/><text x=\"{xx}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            top + ph,
            top + ph + 18.0,
            fmt_coef(c)
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">steering coefficient</text>\
         <text transform=\"translate(22 {}) rotate(-90)\" text-anchor=\"middle\">trait score (solid), 0-100</text>\
         <text transform=\"translate({} {}) rotate(90)\" text-anchor=\"middle\">coherence (dashed), 0-100</text>",
        left + pw / 2.0,
        top + ph + 38.0,
        top + ph / 2.0,
        w - 22.0,
        top + ph / 2.0
    );
    let th = y(r.coherence_threshold);
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{th}\" x2=\"{}\" y2=\"{th}\" stroke=\"#444\" stroke-dasharray=\"2 4\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#444\">coherence threshold {:.0}</text>",
        left + pw,
        left + pw - 4.0,
        th - 5.0,
        r.coherence_threshold
    );
    for (i, &layer) in layers.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts = series(r, layer);
        let path = |f: &dyn Fn(&(f32, f32, f32)) -> f32| {
            pts.iter().map(|p| format!("{:.1},{:.1}", x(p.0), y(f(p)))).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2.2\"/>\
             <polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.6\" stroke-dasharray=\"6 4\"/>",
            path(&|p| p.1),
            path(&|p| p.2)
        );
        for p in &pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>layer {layer}, coefficient {}: trait {:.1}, coherence {:.1}</title></circle>",
                x(p.0),
                y(p.1),
                fmt_coef(p.0),
                p.1,
                p.2
            );
        }
        // Legend: a row below the plot.
        let lx = left + (i % 8) as f32 * (pw / 8.0);
        let ly = top + ph + 62.0 + (i / 8) as f32 * 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">layer {layer}</text>",
            lx + 22.0,
            lx + 28.0,
            ly + 4.0
        );
    }
    if let Some(rec) = &r.recommendation {
        let (cx, cy) = (x(rec.coefficient), y(rec.trait_score));
        let _ = writeln!(
            s,
            "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"9\" fill=\"none\" stroke=\"black\" stroke-width=\"2.5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-weight=\"bold\">recommended: layer {}, coefficient {} (trait {:.0}, coherence {:.0})</text>",
            (cx + 12.0).min(left + pw - 330.0),
            (cy - 12.0).max(top + 14.0),
            rec.layer,
            fmt_coef(rec.coefficient),
            rec.trait_score,
            rec.coherence
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{}\" fill=\"#555\">solid: trait score · dashed: coherence · ring: recommended point</text>",
        h - 12.0
    );
    s + "</svg>\n"
}

fn fmt_coef(c: f32) -> String {
    if c.fract() == 0.0 { format!("{c:.0}") } else { format!("{c}") }
}

/// Red for a high trait score, white for zero.
fn heat(v: f32) -> String {
    let t = (v / 100.0).clamp(0.0, 1.0);
    let (r, g, b) = (255.0 - t * 45.0, 255.0 - t * 200.0, 255.0 - t * 200.0);
    format!("rgb({:.0},{:.0},{:.0})", r, g, b)
}

/// Layers (rows) × coefficients (columns), coloured by trait score and labelled with trait and
/// coherence; cells whose coherence fails the threshold are hatched, the recommended cell framed.
pub fn heatmap_svg(r: &pb::EvaluateSteeringResult) -> String {
    let (layers, coefs) = grid(r);
    let (cw, ch) = (74.0f32, 40.0f32);
    let (left, top) = (90.0f32, 80.0f32);
    let w = left + cw * coefs.len() as f32 + 30.0;
    let h = top + ch * layers.len() as f32 + 100.0;
    let mut s = svg_open(w.max(560.0), h);
    s += "<defs><pattern id=\"hatch\" width=\"8\" height=\"8\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\">\
          <rect width=\"8\" height=\"8\" fill=\"#555\" fill-opacity=\"0.25\"/>\
          <line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"8\" stroke=\"white\" stroke-width=\"3\" stroke-opacity=\"0.85\"/></pattern></defs>\n";
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"28\" font-size=\"17\" font-weight=\"bold\">Trait score of `{}` by layer and coefficient</text>\
         <text x=\"{left}\" y=\"48\" fill=\"#555\">cell: trait / coherence (0-100); hatched: coherence below {:.0}; framed: recommended</text>",
        xml_escape(&r.vector),
        r.coherence_threshold
    );
    for (j, &c) in coefs.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
            left + cw * (j as f32 + 0.5),
            top - 8.0,
            fmt_coef(c)
        );
    }
    for (i, &layer) in layers.iter().enumerate() {
        let yy = top + ch * i as f32;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-weight=\"bold\">layer {layer}</text>",
            left - 8.0,
            yy + ch / 2.0 + 4.0
        );
        for (j, &c) in coefs.iter().enumerate() {
            let xx = left + cw * j as f32;
            let cell = if c == 0.0 {
                r.unsteered.as_ref()
            } else {
                r.cells.iter().find(|x| x.layer == layer && x.coefficient == c)
            };
            let Some(cell) = cell else { continue };
            let failing = c != 0.0 && !cell.coherent;
            let _ = writeln!(
                s,
                "<rect x=\"{xx}\" y=\"{yy}\" width=\"{cw}\" height=\"{ch}\" fill=\"{}\" stroke=\"white\"/>{}\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" paint-order=\"stroke\" stroke=\"white\" stroke-width=\"3\">{:.0} / {:.0}</text>",
                heat(cell.trait_score),
                if failing {
                    format!("<rect x=\"{xx}\" y=\"{yy}\" width=\"{cw}\" height=\"{ch}\" fill=\"url(#hatch)\"/>")
                } else {
                    String::new()
                },
                xx + cw / 2.0,
                yy + ch / 2.0 + 4.0,
                cell.trait_score,
                cell.coherence
            );
            if r.recommendation.as_ref().is_some_and(|rec| rec.layer == layer && rec.coefficient == c) {
                let _ = writeln!(
                    s,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\" stroke-width=\"3\"/>",
                    xx + 1.5,
                    yy + 1.5,
                    cw - 3.0,
                    ch - 3.0
                );
            }
        }
    }
    let base = top + ch * layers.len() as f32;
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">steering coefficient</text>",
        left + cw * coefs.len() as f32 / 2.0,
        base + 24.0
    );
    // Colour scale.
    for k in 0..=10 {
        let v = k as f32 * 10.0;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"26\" height=\"14\" fill=\"{}\"/>",
            left + k as f32 * 26.0,
            base + 44.0,
            heat(v)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">100 trait score</text>",
        base + 74.0,
        left + 11.0 * 26.0 + 70.0,
        base + 74.0
    );
    s + "</svg>\n"
}

/// The spectrum as a self-contained HTML table: one column per point, answer text below its scores.
pub fn spectrum_html(question: &str, r: &pb::SteeringSpectrumResponse) -> String {
    let mut s = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Steering spectrum</title><style>\
         body{font-family:'DejaVu Sans',Arial,sans-serif;margin:24px;color:#222}\
         table{border-collapse:collapse;table-layout:fixed;width:100%}\
         th,td{border:1px solid #ccc;padding:8px;vertical-align:top}\
         th{background:#f4f4f4}td.answer{white-space:pre-wrap;font-size:14px;line-height:1.35}\
         .bar{height:8px;background:#eee;border-radius:4px;margin:3px 0 8px}.bar>div{height:8px;border-radius:4px}\
         .meta{color:#555;font-size:13px}</style></head><body>\n",
    );
    let _ = writeln!(
        s,
        "<h2>Spectrum of <code>{}</code> at layer {}</h2><p><b>Question:</b> {}</p><p class=\"meta\">c = {} ({}) · scorer: {}</p>",
        xml_escape(&r.vector),
        r.layer,
        xml_escape(question),
        fmt_coef(r.coefficient),
        xml_escape(&r.source),
        xml_escape(&r.scorer)
    );
    s += "<table><tr>";
    for p in &r.points {
        let label = match p.multiplier {
            0.0 => "unsteered".to_string(),
            1.0 => "+c".to_string(),
            -1.0 => "−c".to_string(),
            m if m > 0.0 => format!("+{}c", fmt_coef(m)),
            m => format!("−{}c", fmt_coef(-m)),
        };
        let _ = write!(s, "<th>{label}<br><span class=\"meta\">coefficient {}</span></th>", fmt_coef(p.coefficient));
    }
    s += "</tr><tr>";
    for p in &r.points {
        let bar = |v: f32, colour: &str| {
            format!(
                "<div class=\"bar\"><div style=\"width:{:.0}%;background:{colour}\"></div></div>",
                v.clamp(0.0, 100.0)
            )
        };
        if p.scored {
            let _ = write!(
                s,
                "<td>trait {:.0}{}coherence {:.0}{}</td>",
                p.trait_score,
                bar(p.trait_score, "#d62728"),
                p.coherence,
                bar(p.coherence, "#1f77b4")
            );
        } else {
            s += "<td class=\"meta\">not scored (the judge gave no score)</td>";
        }
    }
    s += "</tr><tr>";
    for p in &r.points {
        let _ = write!(s, "<td class=\"answer\">{}</td>", xml_escape(p.answer.trim()));
    }
    s += "</tr></table></body></html>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> pb::EvaluateSteeringResult {
        let cell = |layer, coefficient, trait_score, coherence, coherent| pb::EvalCell {
            layer,
            coefficient,
            trait_score,
            coherence,
            coherent,
            answers: 4,
            ..Default::default()
        };
        pb::EvaluateSteeringResult {
            vector: "evil<1>".into(),
            unsteered: Some(cell(0, 0.0, 3.0, 100.0, true)),
            cells: vec![
                cell(8, 2.0, 55.0, 90.0, true),
                cell(8, 4.0, 80.0, 30.0, false),
                cell(14, 2.0, 20.0, 95.0, true),
            ],
            coherence_threshold: 80.0,
            recommendation: Some(pb::SteeringRecommendation {
                layer: 8,
                coefficient: 2.0,
                trait_score: 55.0,
                coherence: 90.0,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_chart_has_a_line_pair_per_layer_and_marks_the_recommendation() {
        let svg = steering_chart_svg(&result());
        assert_eq!(svg.matches("<polyline").count(), 4, "two layers, trait and coherence each");
        assert!(svg.contains("recommended: layer 8, coefficient 2"));
        assert!(svg.contains("evil&lt;1&gt;"), "titles are escaped");
        assert!(svg.ends_with("</svg>\n"));
    }

    #[test]
    fn the_heat_map_hatches_failing_cells_and_frames_the_recommended_one() {
        let svg = heatmap_svg(&result());
        assert_eq!(svg.matches("fill=\"url(#hatch)\"").count(), 1);
        assert_eq!(svg.matches("stroke=\"black\" stroke-width=\"3\"").count(), 1, "one framed cell");
        assert!(svg.contains("layer 14"));
    }

    #[test]
    fn the_spectrum_page_escapes_answers() {
        let r = pb::SteeringSpectrumResponse {
            vector: "evil".into(),
            points: vec![pb::SpectrumPoint {
                multiplier: 0.0,
                answer: "<b>hi</b>".into(),
                scored: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let html = spectrum_html("Why?", &r);
        assert!(html.contains("&lt;b&gt;hi&lt;/b&gt;") && html.contains("unsteered"));
        let labels = |m: f32| {
            spectrum_html(
                "q",
                &pb::SteeringSpectrumResponse {
                    points: vec![pb::SpectrumPoint { multiplier: m, ..Default::default() }],
                    ..r.clone()
                },
            )
        };
        assert!(labels(-2.0).contains("<th>−2c<br>") && labels(1.0).contains("<th>+c<br>"));
    }
}
