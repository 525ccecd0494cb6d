//! Detection: every config.json family and GGUF architecture maps to its registered variant,
//! and unknown, corrupt, truncated or incomplete inputs give clear errors, never a panic.

mod common;

use llm_pool::models::detect::detect_hf;
use llm_pool::models::{LoadOptions, Model, WeightFormat, ARCHITECTURES};
use serde_json::json;
use std::path::Path;

fn detected_name(config: serde_json::Value) -> Result<&'static str, String> {
    detect_hf(Path::new("config.json"), &config)
        .map(|e| e.name)
        .map_err(|e| e.to_string())
}

#[test]
fn every_safetensors_model_type_and_class_maps_to_its_variant() {
    for entry in ARCHITECTURES
        .iter()
        .filter(|e| e.format == WeightFormat::Safetensors)
    {
        for mt in entry.model_types {
            assert_eq!(
                detected_name(json!({ "model_type": mt })),
                Ok(entry.name),
                "model_type {mt}"
            );
        }
        for class in entry.hf_classes {
            assert_eq!(
                detected_name(json!({ "architectures": [class] })),
                Ok(entry.name),
                "architectures[0] {class}"
            );
        }
    }
}

#[test]
fn model_type_wins_over_architectures_and_falls_back_to_it() {
    assert_eq!(
        detected_name(json!({"model_type": "llama", "architectures": ["Nope"]})),
        Ok("llama")
    );
    assert_eq!(
        detected_name(json!({"model_type": "nope", "architectures": ["LlamaForCausalLM"]})),
        Ok("llama")
    );
}

#[test]
fn unknown_architecture_names_what_was_found_and_lists_the_supported_ones() {
    let err =
        detected_name(json!({"model_type": "bert", "architectures": ["BertModel"]})).unwrap_err();
    assert!(
        err.contains("model_type bert") && err.contains("BertModel"),
        "{err}"
    );
    assert!(err.contains("supported:") && err.contains("llama"), "{err}");
}

#[test]
fn every_gguf_architecture_is_detected_from_general_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in ARCHITECTURES
        .iter()
        .filter(|e| e.format == WeightFormat::Gguf)
    {
        let path = common::tiny_gguf(entry.name, tmp.path())
            .unwrap_or_else(|| panic!("no tiny GGUF writer for {}", entry.name));
        let (_, detected) = llm_pool::models::detect::detect(&path).unwrap();
        assert_eq!(detected.name, entry.name);
    }
}

#[test]
fn unknown_gguf_architecture_is_a_clear_error() {
    use candle_core::quantized::gguf_file::Value;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mamba.gguf");
    common::write_gguf(
        &path,
        vec![("general.architecture", Value::String("mamba".into()))],
        &[common::t("token_embd.weight", &[4, 4])],
        1,
    );
    let err = Model::load(&path, &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("\"mamba\"") && err.contains("supported:") && err.contains("llama"),
        "{err}"
    );
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = common::tiny_gguf("quantized_llama", tmp.path()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 100, bytes.len() / 2, 64, 10, 3] {
        let cut = tmp.path().join(format!("cut{keep}.gguf"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let err = Model::load(&cut, &LoadOptions::cpu())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&cut.display().to_string()), "{err}");
        assert!(
            err.contains("truncated")
                || err.contains("not a valid GGUF")
                || err.contains("remaining"),
            "cut at {keep}: {err}"
        );
    }
}

#[test]
fn corrupt_gguf_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("garbage.gguf");
    std::fs::write(&path, b"this is not a gguf file at all").unwrap();
    let err = Model::load(&path, &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a valid GGUF"), "{err}");

    // Right magic, nonsense header counts.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = Model::load(&path, &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a valid GGUF"), "{err}");
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::hf_fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

#[test]
fn missing_config_is_a_clear_error() {
    let tmp = copy_fixture("llama");
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let err = Model::load(tmp.path(), &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no config.json"), "{err}");
}

#[test]
fn missing_shard_is_a_clear_error() {
    let tmp = copy_fixture("llama");
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = Model::load(tmp.path(), &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing shard model-00001-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    use candle_core::{safetensors, Device};
    let tmp = copy_fixture("llama");
    let single = tmp.path().join("model.safetensors");
    let tensors = safetensors::load(&single, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: std::collections::HashMap<String, candle_core::Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        safetensors::save(&shard, tmp.path().join(file)).unwrap();
        for n in part.iter() {
            weight_map.insert((*n).clone(), json!(file));
        }
    }
    std::fs::remove_file(&single).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let mut sharded = Model::load(tmp.path(), &LoadOptions::cpu()).unwrap();
    let mut original = Model::load(common::hf_fixture("llama"), &LoadOptions::cpu()).unwrap();
    let a = sharded.forward_ids(&[1, 2, 3], 0).unwrap();
    let b = original.forward_ids(&[1, 2, 3], 0).unwrap();
    assert_eq!(a, b);
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let tmp = copy_fixture("llama");
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::load(tmp.path(), &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
}

#[test]
fn a_config_that_does_not_match_the_weights_is_an_error_not_a_panic() {
    let tmp = copy_fixture("llama");
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = json!(999);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Model::load(tmp.path(), &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");
}

#[test]
fn an_unreadable_rope_setting_is_an_error_not_a_default() {
    let tmp = copy_fixture("llama");
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Model::load(tmp.path(), &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("yarn") && err.contains("allowed: default, llama3"),
        "{err}"
    );

    cfg["rope_parameters"] = json!({"rope_type": "default", "rope_theta": "ten thousand"});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Model::load(tmp.path(), &LoadOptions::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("rope_theta") && err.contains("must be a number"),
        "{err}"
    );
}

#[test]
fn bad_device_strings_are_rejected_with_the_allowed_forms() {
    for bad in ["gpu", "cuda:x", "tpu:0"] {
        let err = bad.parse::<llm_pool::DeviceSpec>().unwrap_err().to_string();
        assert!(
            err.contains("allowed: cpu, cuda:N, metal:N"),
            "{bad}: {err}"
        );
    }
    assert_eq!(
        "cuda:1".parse::<llm_pool::DeviceSpec>().unwrap(),
        llm_pool::DeviceSpec::Cuda(1)
    );
    #[cfg(not(feature = "cuda"))]
    {
        let err = llm_pool::models::LoadOptions::for_device(llm_pool::DeviceSpec::Cuda(0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
