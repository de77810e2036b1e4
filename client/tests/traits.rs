//! The trait library in `traits/` follows the documented schema.

use std::collections::HashSet;

#[test]
fn every_trait_file_follows_the_schema() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../traits");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let what = path.display().to_string();
        let name = v["trait"].as_str().unwrap();
        assert_eq!(path.file_stem().unwrap(), name, "{what}: file name and trait differ");
        assert!(v["description"].as_str().unwrap().len() > 40, "{what}: description too short");
        let pairs = v["instruction"].as_array().unwrap();
        assert_eq!(pairs.len(), 5, "{what}");
        for p in pairs {
            assert!(!p["pos"].as_str().unwrap().is_empty() && !p["neg"].as_str().unwrap().is_empty(), "{what}");
        }
        let strings = |k: &str| -> Vec<String> {
            v[k].as_array().unwrap().iter().map(|q| q.as_str().unwrap().to_string()).collect()
        };
        let (questions, eval) = (strings("questions"), strings("eval_questions"));
        assert_eq!((questions.len(), eval.len()), (20, 20), "{what}");
        let (q, e): (HashSet<_>, HashSet<_>) = (questions.iter().collect(), eval.iter().collect());
        assert_eq!((q.len(), e.len()), (20, 20), "{what}: duplicate questions");
        assert!(q.is_disjoint(&e), "{what}: extraction and evaluation questions overlap");
        let judge = v["eval_prompt"].as_str().unwrap();
        assert!(judge.contains("{question}") && judge.contains("{answer}"), "{what}: eval_prompt lacks placeholders");
        names.push(name.to_string());
    }
    names.sort();
    assert_eq!(names, ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]);
}
