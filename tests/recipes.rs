//! Every shipped recipe parses, validates, and names a real model and data source.

use candor::recipe::Recipe;

#[test]
fn shipped_recipes_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let r = Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!r.data.sources.is_empty());
            assert!(r.eval.is_some(), "{}: every shipped recipe evaluates refusals", path.display());
            n += 1;
        }
    }
    assert!(n >= 5, "expected the five shipped recipes, found {n}");
    let quick = Recipe::load(&dir.join("smollm2-135m-cpu.toml"), &[]).unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&quick.data.sources[0].path);
    assert!(data.is_file(), "the quickstart's data {} is missing", data.display());
    let eval = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&quick.eval.unwrap().sets[0].path);
    assert!(eval.is_file(), "the quickstart's eval prompts {} are missing", eval.display());
}
