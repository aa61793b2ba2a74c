//! The JSON Schemas of `proto-json/`, each file registered under its `$id`, for checking
//! fixtures and live answers.

use std::collections::BTreeMap;
use std::path::Path;

use jsonschema::{Registry, Validator};
use serde_json::{Value, json};

/// One validator per schema file of a directory.
pub struct Schemas(BTreeMap<String, Validator>);

impl Schemas {
    pub fn load(dir: &Path) -> Schemas {
        let mut docs = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".schema.json") {
                let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let id = doc["$id"].as_str().unwrap().to_string();
                assert!(id.ends_with(&file), "{file}: $id {id}");
                docs.push((name.to_string(), id, doc));
            }
        }
        assert!(!docs.is_empty(), "no schemas in {}", dir.display());
        let registry = Registry::new()
            .extend(docs.iter().map(|(_, id, doc)| (id.as_str(), doc)))
            .unwrap()
            .prepare()
            .unwrap();
        let validators = docs
            .iter()
            .map(|(name, id, _)| {
                let validator = jsonschema::options()
                    .with_registry(&registry)
                    .should_validate_formats(true)
                    .build(&json!({"$ref": id}))
                    .unwrap_or_else(|e| panic!("schema {name}: {e}"));
                (name.clone(), validator)
            })
            .collect();
        Schemas(validators)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    pub fn errors(&self, schema: &str, value: &Value) -> Vec<String> {
        let validator = self
            .0
            .get(schema)
            .unwrap_or_else(|| panic!("no schema {schema}"));
        validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }

    pub fn check(&self, schema: &str, value: &Value) {
        let errors = self.errors(schema, value);
        assert!(
            errors.is_empty(),
            "does not match {schema}.schema.json: {errors:?}\n{value}"
        );
    }
}
