//! SAM against segment-anything's (and MobileSAM's) `SamPredictor` on the same weights: ViT-B
//! width, heads, patch and window sizes with two encoder blocks (one windowed, one global), and
//! MobileSAM's TinyViT-5M at full depth; the full prompt encoder and mask decoder; weights from
//! the shared recipe (fixtures: `models/fixtures/sam/{vit-b-2layer,mobile-sam}`, made by
//! `models/fixtures/make_sam_fixture.py`).

use std::path::{Path, PathBuf};

use divergen_kernels::testing::{for_each_device, relative_error, to_vec};
use divergen_models::checkpoint::Checkpoint;
use divergen_models::recipe;
use divergen_models::sam::{Point, PointLabel, Prompt, Quantization, Sam};

const VIT_B: &str = "vit-b-2layer";
const MOBILE_SAM: &str = "mobile-sam";

fn fixture(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sam").join(model)
}

fn reference(model: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(model).join("reference.json")).unwrap()).unwrap()
}

fn floats(model: &str, name: &str) -> Vec<f32> {
    std::fs::read(fixture(model).join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn checkpoint(reference: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    recipe::write_checkpoint(
        &dir.path().join("sam.safetensors"),
        reference["keys"].as_object().unwrap(),
    )
    .unwrap();
    dir
}

fn prompt(case: &serde_json::Value, low_res: &std::collections::HashMap<String, Vec<Vec<f32>>>) -> Prompt {
    let nums = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .map(|a| a.iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .unwrap_or_default()
    };
    let labels: Vec<i32> = case["labels"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_i64().unwrap() as i32).collect())
        .unwrap_or_default();
    let points = case["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .zip(&labels)
                .map(|(p, &l)| {
                    let p = nums(p);
                    Point {
                        x: p[0],
                        y: p[1],
                        label: PointLabel::from_sam(l).unwrap(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let bbox = case.get("box").map(|b| {
        let b = nums(b);
        [b[0], b[1], b[2], b[3]]
    });
    let mask = case
        .get("mask_from")
        .map(|from| low_res[from.as_str().unwrap()][2].clone());
    Prompt { points, bbox, mask }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

/// `[1, C, g, g]` (PyTorch) → `[g², C]` token-major, as the model keeps it.
fn token_major(v: &[f32], c: usize) -> Vec<f32> {
    let cells = v.len() / c;
    (0..cells * c).map(|i| v[(i % c) * cells + i / c]).collect()
}

#[test]
fn sam_vit_b_matches_segment_anything_in_f32_and_stays_close_quantized() {
    check_parity(VIT_B);
}

#[test]
fn mobile_sam_matches_mobile_sam_in_f32_and_stays_close_quantized() {
    check_parity(MOBILE_SAM);
}

fn check_parity(model: &str) {
    let reference = reference(model);
    let dir = checkpoint(&reference);
    let image = image::open(fixture(model).join("image.png")).unwrap().into_rgb8();
    let want_embedding = token_major(&floats(model, "embedding.f32"), 256);
    let cases = reference["cases"].as_array().unwrap();
    let first = divergen_kernels::testing::devices()[0].label.clone();
    for_each_device(|device, label| {
        let mut sizes = Vec::new();
        // Quantized formats on the first device only: the f32 pass under phone limits already
        // proves every kernel call fits them, and the quantized GEMMs have their own tests there.
        let formats = [
            (Quantization::None, None),
            (Quantization::Int8, Some(0.999)),
            (Quantization::Int4, Some(0.99)),
        ];
        let formats = if label == first { &formats[..] } else { &formats[..1] };
        for &(quant, min_cosine) in formats {
            let sam = Sam::load(&dir.path().join("sam.safetensors"), quant, device).unwrap();
            sizes.push(sam.linear_bytes().0);
            let embedded = sam.embed_image(&image).unwrap();
            assert_eq!(
                [embedded.input_size.0, embedded.input_size.1],
                [
                    reference["input_size"][0].as_u64().unwrap() as usize,
                    reference["input_size"][1].as_u64().unwrap() as usize
                ]
            );
            let embedding = to_vec(embedded.embedding.clone());
            let err = relative_error(&embedding, &want_embedding);
            let cos = cosine(&embedding, &want_embedding);
            eprintln!("{model} {label} {quant:?}: embedding relative error {err:.2e}, cosine {cos:.6}");
            match min_cosine {
                None => assert!(err <= 1e-4, "{label}: embedding relative error {err:.2e}"),
                Some(min) => assert!(cos >= min, "{label} {quant:?}: embedding cosine {cos} < {min}"),
            }
            let mut low_res = std::collections::HashMap::new();
            for case in cases {
                let name = case["name"].as_str().unwrap();
                let multimask = case["multimask"].as_bool().unwrap();
                let got = sam.predict(&embedded, &prompt(case, &low_res), multimask).unwrap();
                let want_low = floats(model, &format!("{name}.low.f32"));
                let got_low: Vec<f32> = got.low_res.concat();
                let err = relative_error(&got_low, &want_low);
                let cos = cosine(&got_low, &want_low);
                let want_iou: Vec<f32> = case["iou"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                eprintln!(
                    "{label} {quant:?} {name}: mask logits relative error {err:.2e}, cosine {cos:.6}, IoU {:?} vs {want_iou:?}",
                    got.iou
                );
                match min_cosine {
                    None => {
                        assert!(
                            err <= 1e-4,
                            "{label} {name}: low-res mask logits relative error {err:.2e}"
                        );
                        let iou_err = relative_error(&got.iou, &want_iou);
                        assert!(iou_err <= 1e-4, "{label} {name}: IoU {:?} vs {want_iou:?}", got.iou);
                        if case.get("full").is_some() {
                            let full = got.masks.concat();
                            let err = relative_error(&full, &floats(model, &format!("{name}.masks.f32")));
                            assert!(
                                err <= 1e-4,
                                "{label} {name}: full-size mask logits relative error {err:.2e}"
                            );
                        }
                    }
                    Some(min) => assert!(cos >= min, "{label} {quant:?} {name}: mask logits cosine {cos} < {min}"),
                }
                // Later cases feed this one's masks back as the mask prompt, as the fixture did
                // (with the reference's own low-res logits, so errors do not compound).
                let want_planes = want_low
                    .chunks(want_low.len() / got.low_res.len())
                    .map(|c| c.to_vec())
                    .collect();
                low_res.insert(name.to_string(), want_planes);
            }
        }
        eprintln!("{label}: linear bytes f32/int8/int4 = {sizes:?}");
        if sizes.len() == 3 {
            assert!(
                sizes[1] * 3 < sizes[0] && sizes[2] < sizes[1],
                "{label}: quantized sizes {sizes:?}"
            );
        }
    });
}

#[test]
fn pth_checkpoints_read_like_safetensors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sam/pth");
    for file in ["zip.pth", "legacy.pth"] {
        let ckpt = Checkpoint::open(&dir.join(file)).unwrap();
        assert_eq!(
            ckpt.values("layer.weight", &[3, 4]).unwrap(),
            recipe::tensor("layer.weight", &[3, 4]),
            "{file}"
        );
        let bias = ckpt.values("layer.bias", &[3]).unwrap();
        let want: Vec<f32> = recipe::tensor("layer.bias", &[3])
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(bias, want, "{file}: f16 tensor");
        let view = ckpt.values("view.weight", &[3, 4]).unwrap();
        let base = recipe::tensor("view.weight", &[4, 3]);
        let transposed: Vec<f32> = (0..12).map(|i| base[(i % 4) * 3 + i / 4]).collect();
        assert_eq!(view, transposed, "{file}: strided view");
        let err = ckpt.values("layer.weight", &[4, 3]).unwrap_err().to_string();
        assert!(
            err.contains(file) && err.contains("[3, 4]") && err.contains("[4, 3]"),
            "{err}"
        );
        let err = ckpt.values("steps", &[1]).unwrap_err().to_string();
        assert!(err.contains("steps") && err.contains("I64"), "{err}");
    }
}

#[test]
fn a_broken_sam_checkpoint_names_the_file_the_key_and_the_shapes() {
    let device = &divergen_kernels::testing::devices()[0].device;
    let reference = reference(VIT_B);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sam.safetensors");
    let load_error = |keys: &serde_json::Map<String, serde_json::Value>| {
        recipe::write_checkpoint(&path, keys).unwrap();
        Sam::load(&path, Quantization::None, device).err().unwrap().to_string()
    };
    let keys = reference["keys"].as_object().unwrap();

    let mut missing = keys.clone();
    missing.remove("mask_decoder.iou_token.weight");
    let err = load_error(&missing);
    assert!(
        err.contains("sam.safetensors")
            && err.contains("missing tensor mask_decoder.iou_token.weight (expected shape [1, 256])"),
        "{err}"
    );

    let mut reshaped = keys.clone();
    reshaped.insert(
        "image_encoder.blocks.1.mlp.lin2.weight".into(),
        serde_json::json!([768, 3000]),
    );
    let err = load_error(&reshaped);
    assert!(
        err.contains("image_encoder.blocks.1.mlp.lin2.weight has shape [768, 3000], expected [768, 3072]"),
        "{err}"
    );

    // An integer tensor where a float one belongs.
    recipe::write_checkpoint(&path, keys).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = ckpt
        .keys()
        .into_iter()
        .map(|(k, shape)| {
            let values = ckpt.values(&k, &shape).unwrap();
            let bytes = if k == "prompt_encoder.no_mask_embed.weight" {
                values.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect()
            } else {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            };
            (k, shape, bytes)
        })
        .collect();
    drop(ckpt);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter_mut()
        .map(|(k, shape, bytes)| {
            let dtype = if k == "prompt_encoder.no_mask_embed.weight" {
                safetensors::Dtype::I32
            } else {
                safetensors::Dtype::F32
            };
            (
                k.clone(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let err = Sam::load(&path, Quantization::None, device).err().unwrap().to_string();
    assert!(
        err.contains("no_mask_embed.weight is I32; expected a float tensor"),
        "{err}"
    );

    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = Sam::load(&path, Quantization::None, device).err().unwrap().to_string();
    assert!(err.contains("sam.safetensors") && err.contains("truncated"), "{err}");
}
