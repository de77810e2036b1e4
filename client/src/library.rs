//! The trait and vector libraries: `persona traits`, `persona vectors` and `persona project`.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use persona_client::{Client, pb};
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum TraitsCmd {
    /// One line per trait.
    List,
    /// A trait's definition as JSON.
    Show { name: String },
    /// Draft a definition from a name and a description; writes JSON to --out or stdout.
    New {
        name: String,
        #[arg(long)]
        description: String,
        /// Ask the server's judge model to write it instead of the built-in templates.
        #[arg(long)]
        llm: bool,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
pub(crate) struct ProjectArgs {
    /// The user message.
    pub(crate) user: String,
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Assistant answer to score.
    #[arg(long, default_value = "")]
    pub(crate) response: String,
    /// VECTOR[:LAYER]; repeatable. Without a layer, the vector's recommended one.
    #[arg(long = "vector", value_name = "VECTOR[:LAYER]", required = true)]
    pub(crate) vectors: Vec<String>,
    #[arg(long, default_value = "")]
    pub(crate) model: String,
    /// Also print the projection at every token.
    #[arg(long)]
    pub(crate) per_token: bool,
}

#[derive(Subcommand)]
pub(crate) enum VectorsCmd {
    List {
        #[arg(long, default_value = "")]
        model: String,
    },
    Get {
        name: String,
        /// Write the values as JSON ({"info":…, "values":[[…]…]}) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Store a vector from a JSON file holding a list of rows ([[f32; d_model]; n_layers+1]).
    Put {
        name: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long = "trait", default_value = "")]
        trait_name: String,
        #[arg(long)]
        overwrite: bool,
    },
    Rm {
        name: String,
    },
    /// Store a vector from a llama.cpp/repeng control-vector GGUF, a persona_vectors .pt file or
    /// our safetensors file (format detected from the bytes unless --format says).
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// auto, gguf, pt or safetensors.
        #[arg(long, default_value = "auto")]
        format: String,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long = "trait", default_value = "")]
        trait_name: String,
        /// Recommended layer to record with the vector.
        #[arg(long)]
        layer: Option<u32>,
        #[arg(long)]
        overwrite: bool,
    },
    /// Carry a stored vector to another served model (any architecture) through a linear map
    /// between the two residual streams, fitted on texts both read; stored as NAME.TO unless
    /// --name says.
    Transfer {
        vector: String,
        /// The vector's model (a check; default: whichever it belongs to).
        #[arg(long, default_value = "")]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Source layer (default: the vector's recommended layer).
        #[arg(long)]
        source_layer: Option<u32>,
        /// Target layer (default: the same relative depth).
        #[arg(long, conflicts_with = "search")]
        target_layer: Option<u32>,
        /// Pick the target layer with the best held-out R².
        #[arg(long)]
        search: bool,
        /// Carry every target layer from the source layer at its depth (one fit per layer), for
        /// a vector comparable layer by layer with a native one.
        #[arg(long, conflicts_with_all = ["search", "source_layer"])]
        all_layers: bool,
        /// ridge or procrustes.
        #[arg(long, default_value = "ridge", value_parser = ["ridge", "procrustes"])]
        method: String,
        /// Aligned word ends to fit and test on (0 = the server's 3000).
        #[arg(long, default_value_t = 0)]
        max_samples: u32,
        #[arg(long)]
        overwrite: bool,
    },
    /// Write a stored vector as a control-vector GGUF (llama.cpp --control-vector) or safetensors.
    Export {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// gguf or safetensors.
        #[arg(long, default_value = "gguf")]
        format: String,
    },
}

pub(crate) async fn traits(c: &mut Client, cmd: TraitsCmd) -> Result<()> {
    match cmd {
        TraitsCmd::List => {
            for t in c.list_traits(pb::ListTraitsRequest {}).await?.into_inner().traits {
                println!(
                    "{}\t{} pairs, {} questions\t{}",
                    t.trait_name,
                    t.instruction.len(),
                    t.questions.len(),
                    t.description
                );
            }
        }
        TraitsCmd::Show { name } => {
            let all = c.list_traits(pb::ListTraitsRequest {}).await?.into_inner().traits;
            let known: Vec<String> = all.iter().map(|t| t.trait_name.clone()).collect();
            let t = all
                .into_iter()
                .find(|t| t.trait_name == name)
                .with_context(|| format!("no trait `{name}` (known: {})", known.join(", ")))?;
            println!("{}", persona_client::trait_to_json(&t));
        }
        TraitsCmd::New { name, description, llm, out } => {
            let r = c
                .draft_trait(pb::DraftTraitRequest { trait_name: name, description, use_llm: llm })
                .await?
                .into_inner();
            let json = persona_client::trait_to_json(&r.definition.context("server sent no definition")?);
            match out {
                Some(path) => {
                    std::fs::write(&path, json + "\n")?;
                    eprintln!("wrote {} (generator: {})", path.display(), r.generator);
                }
                None => println!("{json}"),
            }
        }
    }
    Ok(())
}

pub(crate) fn print_vector(v: &pb::VectorInfo) {
    let kind = pb::VectorKind::try_from(v.kind).map(|k| k.as_str_name()).unwrap_or("?");
    let (best, norm) =
        v.row_norms.iter().enumerate().fold((0, 0f32), |acc, (i, n)| if *n > acc.1 { (i, *n) } else { acc });
    let layer = v.recommended_layer.map_or("-".to_string(), |l| l.to_string());
    println!(
        "{}\tmodel={} trait={} kind={kind} shape=[{}, {}] recommended layer={layer} largest-norm row={best} ({norm:.2}) {}",
        v.name, v.model, v.trait_name, v.n_rows, v.d_model, v.description
    );
}

pub(crate) async fn project(c: &mut Client, a: ProjectArgs) -> Result<()> {
    let targets = a
        .vectors
        .iter()
        .map(|s| {
            Ok(match s.rsplit_once(':') {
                Some((v, l)) => {
                    pb::ProjectionTarget { vector: v.to_string(), layer: Some(l.parse().context("layer")?) }
                }
                None => pb::ProjectionTarget { vector: s.clone(), layer: None },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let Some(pb::prompt::Kind::Chat(conversation)) = persona_client::chat(&a.user, a.system.as_deref()).kind else {
        unreachable!("chat() builds a conversation")
    };
    let r = c
        .project_activation(pb::ProjectActivationRequest {
            model: a.model,
            conversation: Some(conversation),
            response: a.response,
            targets,
            per_token: a.per_token,
        })
        .await?
        .into_inner();
    println!(
        "vector\tlayer\tprompt_last\tprompt_avg\tresponse_avg\t(calibrated 0-100: helpful rollouts 0, trait rollouts 100)"
    );
    for p in &r.projections {
        let resp = if p.has_response { format!("{:.4}", p.response_avg) } else { "-".into() };
        let cal = if !p.calibrated {
            p.uncalibrated_reason.clone()
        } else if p.has_response {
            format!("{:.0}\t{:.0}\t{:.0}", p.prompt_last_calibrated, p.prompt_avg_calibrated, p.response_avg_calibrated)
        } else {
            format!("{:.0}\t{:.0}\t-", p.prompt_last_calibrated, p.prompt_avg_calibrated)
        };
        println!("{}\t{}\t{:.4}\t{:.4}\t{resp}\t{cal}", p.vector, p.layer, p.prompt_last, p.prompt_avg);
    }
    if a.per_token {
        let names: Vec<String> = r.projections.iter().map(|p| format!("{}@{}", p.vector, p.layer)).collect();
        println!("\n#\tpart\ttoken\t{}", names.join("\t"));
        for (i, t) in r.tokens.iter().enumerate() {
            let part = if i < r.prompt_tokens as usize { "prompt" } else { "response" };
            let vals: Vec<String> = r.projections.iter().map(|p| format!("{:.3}", p.per_token[i])).collect();
            println!("{i}\t{part}\t{t:?}\t{}", vals.join("\t"));
        }
    }
    Ok(())
}

pub(crate) async fn vectors(c: &mut Client, cmd: VectorsCmd) -> Result<()> {
    match cmd {
        VectorsCmd::List { model } => {
            for v in c.list_vectors(pb::ListVectorsRequest { model }).await?.into_inner().vectors {
                print_vector(&v);
            }
        }
        VectorsCmd::Get { name, out } => {
            let r = c.get_vector(pb::GetVectorRequest { name, include_values: out.is_some() }).await?.into_inner();
            let info = r.info.context("server sent no vector info")?;
            print_vector(&info);
            print_calibration(&info);
            if let Some(path) = out {
                let rows: Vec<&[f32]> = r.values.chunks(info.d_model.max(1) as usize).collect();
                let json = serde_json::json!({ "name": info.name, "model": info.model, "trait": info.trait_name, "values": rows });
                std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
                eprintln!("wrote {}", path.display());
            }
        }
        VectorsCmd::Put { name, file, model, trait_name, overwrite } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let rows = v.get("values").unwrap_or(&v);
            let rows: Vec<Vec<f32>> =
                serde_json::from_value(rows.clone()).context("expected a list of rows of floats")?;
            let r = c
                .put_vector(pb::PutVectorRequest {
                    name,
                    model,
                    trait_name,
                    kind: pb::VectorKind::ResponseAvg as i32,
                    values: rows.concat(),
                    description: format!("imported from {}", file.display()),
                    overwrite,
                })
                .await?
                .into_inner();
            print_vector(&r.info.context("server sent no vector info")?);
        }
        VectorsCmd::Rm { name } => {
            c.delete_vector(pb::DeleteVectorRequest { name: name.clone() }).await?;
            println!("deleted {name}");
        }
        VectorsCmd::Import { file, name, format, model, trait_name, layer, overwrite } => {
            let data = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = c
                .import_vector(pb::ImportVectorRequest {
                    name,
                    model,
                    format: vector_format(&format)? as i32,
                    data,
                    trait_name,
                    kind: pb::VectorKind::ResponseAvg as i32,
                    description: format!("imported from {}", file.display()),
                    overwrite,
                    recommended_layer: layer,
                })
                .await?
                .into_inner();
            print_vector(&r.info.context("server sent no vector info")?);
        }
        VectorsCmd::Transfer {
            vector,
            from,
            to,
            name,
            source_layer,
            target_layer,
            search,
            all_layers,
            method,
            max_samples,
            overwrite,
        } => {
            let method =
                if method == "procrustes" { pb::TransferMethod::Procrustes } else { pb::TransferMethod::Ridge };
            let req = pb::TransferVectorRequest {
                vector,
                to_model: to,
                name,
                source_layer,
                target_layer,
                search_target_layer: search,
                method: method as i32,
                max_samples,
                overwrite,
                from_model: from,
                all_layers,
            };
            let mut stream = c.transfer_vector(req).await?.into_inner();
            let mut progress = crate::progress::Progress::new();
            while let Some(msg) = stream.message().await.inspect_err(|_| progress.finish())? {
                match msg.event {
                    Some(pb::transfer_vector_response::Event::Progress(p)) => progress.update(
                        &p.stage,
                        p.done.into(),
                        p.total.into(),
                        &format!("elapsed {:.1}s", p.elapsed_secs),
                    ),
                    Some(pb::transfer_vector_response::Event::Result(r)) => {
                        progress.finish();
                        println!(
                            "{} aligned word ends of {} texts, {:.1} s; |transferred| / |source| = {:.3}",
                            r.samples, r.texts, r.elapsed_secs, r.norm_ratio
                        );
                        println!("source layer\ttarget layer\tridge R²\tpenalty\tProcrustes R²");
                        for f in &r.fits {
                            let rot = f.procrustes_r2.map_or("-".to_string(), |v| format!("{v:.3}"));
                            println!(
                                "{}\t{}\t{:.3}\t{:.0e}\t{rot}",
                                f.source_layer, f.target_layer, f.ridge_r2, f.ridge_lambda
                            );
                        }
                        print_vector(&r.vector.context("server sent no vector info")?);
                    }
                    None => {}
                }
            }
        }
        VectorsCmd::Export { name, out, format } => {
            let r = c.export_vector(pb::ExportVectorRequest { name, format: vector_format(&format)? as i32 }).await?;
            let r = r.into_inner();
            std::fs::write(&out, &r.data).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {} ({} bytes, {})", out.display(), r.data.len(), r.extension);
        }
    }
    Ok(())
}

pub(crate) fn vector_format(s: &str) -> Result<pb::VectorFormat> {
    Ok(match s {
        "auto" => pb::VectorFormat::Unspecified,
        "gguf" => pb::VectorFormat::Gguf,
        "pt" | "torch" => pb::VectorFormat::Torch,
        "safetensors" => pb::VectorFormat::Safetensors,
        other => bail!("unknown format `{other}` (auto, gguf, pt or safetensors)"),
    })
}

pub(crate) fn print_calibration(v: &pb::VectorInfo) {
    match &v.steering {
        Some(s) => println!(
            "steering recommendation: layer {}, coefficient {} (trait {:.1} vs {:.1} unsteered, coherence {:.1} vs {:.1}; {})",
            s.layer,
            s.coefficient,
            s.trait_score,
            s.unsteered_trait_score,
            s.coherence,
            s.unsteered_coherence,
            s.scorer
        ),
        None => println!("steering recommendation: none (run `persona eval --vector {}`)", v.name),
    }
    if v.calibration.is_empty() {
        println!("calibration: none (raw projections only)");
        return;
    }
    println!("layer\tresponse helpful (0)\tresponse trait (100)\tprompt_last helpful (0)\tprompt_last trait (100)");
    let side = |s: &Option<pb::SideStats>| {
        s.as_ref().map_or("-".into(), |s| format!("{:.2} ± {:.2} (n={})", s.mean, s.std, s.n))
    };
    for c in &v.calibration {
        let (r, p) = (c.response.unwrap_or_default(), c.prompt_last.unwrap_or_default());
        println!("{}\t{}\t{}\t{}\t{}", c.layer, side(&r.neg), side(&r.pos), side(&p.neg), side(&p.pos));
    }
}
