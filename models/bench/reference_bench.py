"""The models `divergen bench models` times, in PyTorch CPU and ONNX Runtime CPU, on the same
machine in the same sitting: CLIP ViT-B/32's vision tower (batch 8 at 224²), SAM ViT-B's and
MobileSAM's image encoders at 1024² and their prompt encoder + mask decoder (four corner points,
three masks), SD-Turbo's UNet (one step at 256² and 512²) and the SD VAE / TAESD decodes. Random
weights at full size, like ours. f32 everywhere; int8 as each runtime's own
dynamic int8 on linear layers (PyTorch `quantize_dynamic` on nn.Linear, ONNX Runtime
`quantize_dynamic` on MatMul/Gemm). Neither has a CPU int4 path for these models, so no int4 row.

Run by hand in the reference environment (never in CI):
    source ~/.cache/divergen-refenv/venv/bin/activate
    python models/bench/reference_bench.py [--runs 3] [--threads 2] > reference.jsonl
(DIVERGEN_SD_SIDES=256 limits the diffusion cases to 256².)
Each case runs in its own process so its peak RSS is its own; one JSON line per case.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

CASES = [(m, rt, q) for m in ("clip-vit-b-32", "sam-vit-b", "mobile-sam", "sd-turbo-unet")
         for rt in ("pytorch", "onnxruntime") for q in ("none", "int8")] + [
    (m, rt, "none") for m in ("sd-vae", "taesd") for rt in ("pytorch", "onnxruntime")]
SD_SIDES = tuple(int(v) for v in os.environ.get("DIVERGEN_SD_SIDES", "256,512").split(","))


def build(model):
    import torch
    if model == "clip-vit-b-32":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        net = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=32, hidden_act="quick_gelu")).eval()

        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, pixels):
                return self.net(pixel_values=pixels).image_embeds

        return Vision().eval(), None, torch.randn(8, 3, 224, 224)
    if model == "sam-vit-b":
        from segment_anything import sam_model_registry
        from segment_anything.utils.onnx import SamOnnxModel
        sam = sam_model_registry["vit_b"]().eval()
    else:
        warnings.filterwarnings("ignore")
        from mobile_sam import sam_model_registry
        from mobile_sam.utils.onnx import SamOnnxModel
        sam = sam_model_registry["vit_t"]().eval()
    return sam.image_encoder, (sam, SamOnnxModel), torch.randn(1, 3, 1024, 1024)


def run_diffusion(model, runtime, quant, runs, threads):
    """SD-Turbo's UNet (SD 2.1-base shapes) one step per side; the VAE and TAESD decodes."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    torch.set_num_threads(threads)
    if model == "sd-turbo-unet":
        net = UNet2DConditionModel(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                                   cross_attention_dim=1024, use_linear_projection=True, sample_size=64).eval()

        class Step(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, latents, t, context):
                return self.net(latents, t, encoder_hidden_states=context).sample

        module = Step().eval()
        if quant == "int8" and runtime == "pytorch":
            module = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        if model == "sd-vae":
            vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                down_block_types=["DownEncoderBlock2D"] * 4,
                                up_block_types=["UpDecoderBlock2D"] * 4).eval()
        else:
            vae = AutoencoderTiny().eval()

        class Decode(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vae = vae

            def forward(self, latents):
                return self.vae.decode(latents).sample

        module = Decode().eval()
    for side in SD_SIDES:
        z = torch.randn(1, 4, side // 8, side // 8)
        if model == "sd-turbo-unet":
            args = (z, torch.tensor([999.0]), torch.randn(1, 77, 1024))
        else:
            args = (z,)
        if runtime == "pytorch":
            with torch.no_grad():
                first, median = timed(lambda: module(*args), runs)
        else:
            import onnxruntime as ort
            from onnxruntime.quantization import QuantType, quantize_dynamic
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            names = ["latents", "t", "context"][:len(args)]
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "model.onnx")
                # Over 2 GB: the weights go to external data files beside the graph.
                torch.onnx.export(module, args, path, input_names=names, opset_version=17)
                if quant == "int8":
                    quantize_dynamic(path, path + ".q", weight_type=QuantType.QInt8,
                                     op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
                    path = path + ".q"
                sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                feed = {name: a.numpy() for name, a in zip(names, args)}
                first, median = timed(lambda: sess.run(None, feed), runs)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(dict(model=model, runtime=runtime, quant=quant, stage=f"{side}", first_ms=first,
                              median_ms=median, per_second=1e3 / median, peak_rss_mib=rss, threads=threads,
                              torch=torch.__version__)), flush=True)


def decoder_inputs(torch):
    c = 1023.0
    return dict(
        image_embeddings=torch.randn(1, 256, 64, 64),
        point_coords=torch.tensor([[[0.0, 0.0], [c, 0.0], [0.0, c], [c, c], [0.0, 0.0]]]),
        point_labels=torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0]]),
        mask_input=torch.zeros(1, 1, 256, 256),
        has_mask_input=torch.tensor([0.0]),
    )


def timed(fn, runs):
    start = time.perf_counter()
    fn()
    first = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return first, times[len(times) // 2]


def run_case(model, runtime, quant, runs, threads):
    if model in ("sd-turbo-unet", "sd-vae", "taesd"):
        return run_diffusion(model, runtime, quant, runs, threads)
    import torch
    torch.set_num_threads(threads)
    encoder, sam, x = build(model)
    stages = []
    if model != "clip-vit-b-32":
        sam_model, onnx_cls = sam
        # The predictor's decoding path without full-size post-processing, as ours is timed.
        decoder = onnx_cls(sam_model, return_single_mask=False)
        inputs = decoder_inputs(torch)
    out = {}
    if runtime == "pytorch":
        if quant == "int8":
            encoder = torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear}, dtype=torch.qint8)
        with torch.no_grad():
            out["encoder"] = timed(lambda: encoder(x), runs)
            if model != "clip-vit-b-32":
                dec = decoder
                if quant == "int8":
                    dec = torch.ao.quantization.quantize_dynamic(decoder, {torch.nn.Linear}, dtype=torch.qint8)
                # SamOnnxModel also upsamples to orig_im_size; give it the low-res size so it
                # does the same work as ours (masks at 256², no full-size interpolation).
                kw = dict(inputs, orig_im_size=torch.tensor([256.0, 256.0]))
                out["decoder"] = timed(lambda: dec(**kw), max(runs, 3))
    else:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        with tempfile.TemporaryDirectory() as d:
            def session(module, args, names, path, dynamic=None):
                torch.onnx.export(module, args, path, input_names=names, opset_version=17,
                                  do_constant_folding=True, dynamic_axes=dynamic)
                if quant == "int8":
                    # Linear layers only, as ours and PyTorch's dynamic int8 (convolutions stay
                    # f32; quantizing TinyViT's folded convs also fails in ORT's quantizer).
                    quantize_dynamic(path, path + ".q", weight_type=QuantType.QInt8,
                                     op_types_to_quantize=["MatMul", "Gemm"])
                    path = path + ".q"
                return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            enc = session(encoder, (x,), ["x"], os.path.join(d, "encoder.onnx"))
            feed = {"x": x.numpy()}
            out["encoder"] = timed(lambda: enc.run(None, feed), runs)
            if model != "clip-vit-b-32":
                kw = dict(inputs, orig_im_size=torch.tensor([256.0, 256.0]))
                names = list(kw.keys())
                dec = session(decoder, tuple(kw.values()), names, os.path.join(d, "decoder.onnx"),
                              dynamic={"point_coords": {1: "n"}, "point_labels": {1: "n"}})
                feed = {k: v.numpy() for k, v in kw.items()}
                out["decoder"] = timed(lambda: dec.run(None, feed), max(runs, 3))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for stage, (first, median) in out.items():
        items = 8 if model == "clip-vit-b-32" else 1
        print(json.dumps(dict(model=model, runtime=runtime, quant=quant, stage=stage, first_ms=first,
                              median_ms=median, per_second=items * 1e3 / median, peak_rss_mib=rss,
                              threads=threads, torch=torch.__version__)), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", nargs=3)
    a = p.parse_args()
    if a.case:
        run_case(*a.case, a.runs, a.threads)
        return
    for case in CASES:
        r = subprocess.run([sys.executable, __file__, "--runs", str(a.runs), "--threads", str(a.threads),
                            "--case", *case], capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        if r.returncode != 0:
            print(json.dumps(dict(model=case[0], runtime=case[1], quant=case[2],
                                  error=r.stderr.strip().splitlines()[-1:])), flush=True)


if __name__ == "__main__":
    main()
