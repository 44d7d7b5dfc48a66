//! CLIP against transformers' `CLIPModel` on the same weights: OpenAI ViT-B/32 widths, heads
//! and patch size, two blocks per tower, weights from the shared recipe (fixture:
//! `models/fixtures/clip/vit-b-32-2layer`, made by `models/fixtures/make_clip_fixture.py`).

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use divergen_kernels::testing::{assert_close, for_each_device, to_vec};
use divergen_models::clip::{Clip, Quantization};
use divergen_models::recipe;
use safetensors::{Dtype, tensor::TensorView};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clip/vit-b-32-2layer")
}

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join("reference.json")).unwrap()).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// A Hugging Face CLIPModel folder: the fixture's config.json and a model.safetensors with
/// every key the reference model had, filled from the recipe.
fn checkpoint_dir(reference: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("config.json"), dir.path().join("config.json")).unwrap();
    recipe::write_checkpoint(
        &dir.path().join("model.safetensors"),
        reference["keys"].as_object().unwrap(),
    )
    .unwrap();
    dir
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn clip_matches_transformers_in_f32_and_stays_close_quantized() {
    let reference = reference();
    let dir = checkpoint_dir(&reference);
    // Token ids are below 2^24, so they survive the trip through f32.
    let ids: Vec<Vec<u32>> = rows(&reference["input_ids"])
        .into_iter()
        .map(|r| r.into_iter().map(|t| t as u32).collect())
        .collect();
    let want_images = rows(&reference["image_embeds"]);
    let want_texts = rows(&reference["text_embeds"]);
    let pixels = recipe::values("pixel_values", 2 * 3 * 224 * 224, 2.0, 0.0);
    for_each_device(|device, label| {
        let mut sizes = Vec::new();
        for (quant, min_cosine) in [
            (Quantization::None, None),
            (Quantization::Int8, Some(0.999)),
            (Quantization::Int4, Some(0.99)),
        ] {
            let clip = Clip::load(dir.path(), quant, device).unwrap();
            sizes.push(clip.linear_bytes().0);
            let images = clip
                .vision
                .forward(Tensor::from_data(
                    TensorData::new(pixels.clone(), [2, 3, 224, 224]),
                    device,
                ))
                .unwrap();
            let texts = clip.text.forward(&ids).unwrap();
            let (got_images, got_texts) = (to_vec(images), to_vec(texts));
            let want_flat_images: Vec<f32> = want_images.concat();
            let want_flat_texts: Vec<f32> = want_texts.concat();
            match min_cosine {
                None => {
                    assert_close(
                        &got_images,
                        &want_flat_images,
                        1e-4,
                        &format!("{label}: image embeddings"),
                    );
                    assert_close(&got_texts, &want_flat_texts, 1e-4, &format!("{label}: text embeddings"));
                }
                Some(min) => {
                    for (i, want) in want_images.iter().chain(&want_texts).enumerate() {
                        let got = if i < want_images.len() {
                            &got_images[i * 512..(i + 1) * 512]
                        } else {
                            let j = i - want_images.len();
                            &got_texts[j * 512..(j + 1) * 512]
                        };
                        let c = cosine(got, want);
                        assert!(c >= min, "{label} {quant:?}: embedding {i} cosine {c} < {min}");
                    }
                }
            }
        }
        // f32 → int8 is about 4x smaller (plus per-channel scales); int4 MLPs shrink it further.
        assert!(
            sizes[1] * 3 < sizes[0] && sizes[2] < sizes[1],
            "linear-layer bytes f32/int8/int4: {sizes:?}"
        );
    });
}

#[test]
fn a_broken_checkpoint_names_the_file_the_key_and_the_shapes() {
    let device = &divergen_kernels::testing::devices()[0].device;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("config.json"), dir.path().join("config.json")).unwrap();
    let weights = dir.path().join("model.safetensors");
    let load_error = || {
        Clip::load(dir.path(), Quantization::None, device)
            .err()
            .unwrap()
            .to_string()
    };

    let empty: Vec<(String, TensorView)> = Vec::new();
    safetensors::serialize_to_file(empty, None, &weights).unwrap();
    let err = load_error();
    assert!(
        err.contains("model.safetensors")
            && err.contains("missing tensor text_model.embeddings.token_embedding.weight"),
        "{err}"
    );

    // A checkpoint holding only a 2x2 token embedding of the given type.
    let write_token_embedding = |dtype: Dtype, bytes: &[u8]| {
        let view = TensorView::new(dtype, vec![2, 2], bytes).unwrap();
        let key = "text_model.embeddings.token_embedding.weight".to_string();
        safetensors::serialize_to_file(vec![(key, view)], None, &weights).unwrap();
    };
    write_token_embedding(Dtype::F32, bytemuck::cast_slice(&[0f32; 4]));
    let err = load_error();
    assert!(
        err.contains("token_embedding.weight has shape [2, 2], expected [49408, 512]"),
        "{err}"
    );

    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 8]).unwrap();
    let err = load_error();
    assert!(
        err.contains("model.safetensors") && (err.contains("truncated") || err.contains("not a valid")),
        "{err}"
    );

    write_token_embedding(Dtype::I32, bytemuck::cast_slice(&[0i32; 4]));
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"text_config": {"vocab_size": 2, "hidden_size": 2, "num_attention_heads": 1}}"#,
    )
    .unwrap();
    let err = load_error();
    assert!(err.contains("is I32; expected a float tensor"), "{err}");

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"text_config": {"hidden_act": "swish"}}"#,
    )
    .unwrap();
    let err = load_error();
    assert!(err.contains("config.json") && err.contains("swish"), "{err}");
}
