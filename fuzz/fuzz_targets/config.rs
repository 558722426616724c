//! The config loader: TOML text → validated settings.
//!
//! Properties: any text is either refused with a one-line reason or accepted as settings
//! whose every alias resolves to deployments of configured providers and whose every
//! fallback names a configured alias; loading is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::config::Settings;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |var: &str| (var.len() % 2 == 0).then(|| format!("v-{var}"));
    match Settings::from_toml(text, &env) {
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "a reason on one line: {e}");
            let again = Settings::from_toml(text, &env).err().map(|e| e.to_string());
            assert_eq!(
                again,
                Some(e.to_string()),
                "the same text, the same refusal"
            );
        }
        Ok(settings) => {
            for (alias, model) in &settings.models {
                let deployments = model.deployments(alias);
                assert!(!deployments.is_empty(), "alias {alias} has no deployment");
                for (provider, _, _) in &deployments {
                    assert!(
                        settings.providers.contains_key(provider),
                        "alias {alias} names the unknown provider {provider}"
                    );
                }
                for fallback in &model.fallbacks {
                    assert!(
                        settings.models.contains_key(fallback),
                        "fallback {fallback}"
                    );
                }
            }
        }
    }
});
