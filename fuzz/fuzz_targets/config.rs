//! Configuration loading (PRODUCT.md §10): any file text and any `TALLY_*` overrides load or fail
//! with an error, never panic; a string key set from the environment keeps its text exactly,
//! whatever it looks like; an error about an override names its variable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::config::IngestConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    // Layout: file text, then lines `NAME=value` after a `\n---\n` separator.
    let (file, env) = s.split_once("\n---\n").unwrap_or((s, ""));
    let mut vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("TALLY_{}", k.trim_start_matches("TALLY_")), v.to_string()))
        .collect();
    let text_for_group = env.lines().next().unwrap_or("").to_string();
    if !text_for_group.contains('\0') {
        vars.push(("TALLY_KAFKA_GROUP_ID".into(), text_for_group.clone()));
    }
    match IngestConfig::parse(file, vars.clone()) {
        Ok(cfg) => {
            assert!(cfg.validate().is_ok());
            if !text_for_group.contains('\0') {
                assert_eq!(cfg.kafka.group_id, text_for_group, "a string override keeps its text");
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.trim_end().len() > "invalid config:".len(), "an error that says nothing: {msg:?}");
            // With an empty file, only an override can be at fault: the error names one.
            if file.is_empty() && !matches!(e, tally::config::ConfigError::Invalid { .. }) {
                assert!(vars.iter().any(|(k, _)| msg.contains(k.as_str())), "error names no variable: {msg}");
            }
        }
    }
});
