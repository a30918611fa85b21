#!/usr/bin/env python3
"""Build random-weight streaming Sortformer `.nemo` files from the public v2 architecture.

`--full` is the real shape of `nvidia/diar_streaming_sortformer_4spk-v2.1` (17 FastConformer
layers d=512, 18 Transformer layers d=192, 128 mel features, 4 speakers, 117.7M parameters,
~470 MB): the same compute and memory as the real checkpoint, for benchmarks. `--tiny` keeps
the same front end, modules and streaming logic with few narrow layers, for unit tests (seconds).

Random weights prove plumbing, equivalence and cost, never accuracy. The final speaker layer
is scaled up so that outputs span 0..1 (untrained ones sit near 0.55), which exercises the
speaker-cache compression the way real speech does.

    python scripts/make_test_models.py --tiny --out .cache/test-models/tiny.nemo
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

# The public v2 streaming architecture (NeMo's streaming_sortformer_diarizer_4spk-v2 config),
# without the training-only parts. The front end is the production streaming one: no
# per-utterance normalisation (it cannot be computed live) and no dither.
FULL: dict[str, Any] = {
    "sample_rate": 16000,
    "pil_weight": 0.5,
    "ats_weight": 0.5,
    "max_num_of_spks": 4,
    "streaming_mode": True,
    "model_defaults": {"fc_d_model": 512, "tf_d_model": 192},
    "train_ds": None,
    "validation_ds": None,
    "test_ds": None,
    "preprocessor": {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "normalize": "NA",
        "window_size": 0.025,
        "sample_rate": 16000,
        "window_stride": 0.01,
        "window": "hann",
        "features": 128,
        "n_fft": 512,
        "frame_splicing": 1,
        "dither": 0.0,
    },
    "sortformer_modules": {
        "_target_": "nemo.collections.asr.modules.sortformer_modules.SortformerModules",
        "num_spks": 4,
        "dropout_rate": 0.5,
        "fc_d_model": 512,
        "tf_d_model": 192,
        "spkcache_len": 188,
        "fifo_len": 0,
        "chunk_len": 188,
        "spkcache_update_period": 188,
        "chunk_left_context": 1,
        "chunk_right_context": 1,
        "spkcache_sil_frames_per_spk": 3,
        "scores_add_rnd": 0,
        "pred_score_threshold": 0.25,
        "max_index": 99999,
        "scores_boost_latest": 0.05,
        "sil_threshold": 0.2,
        "strong_boost_rate": 0.75,
        "weak_boost_rate": 1.5,
        "min_pos_scores_rate": 0.5,
        "causal_attn_rate": 0.5,
        "causal_attn_rc": 7,
    },
    "encoder": {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 128,
        "feat_out": -1,
        "n_layers": 17,
        "d_model": 512,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": 256,
        "causal_downsampling": False,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": 8,
        "att_context_size": [-1, -1],
        "att_context_style": "regular",
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "conv_context_size": None,
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
        "stochastic_depth_drop_prob": 0.0,
        "stochastic_depth_mode": "linear",
        "stochastic_depth_start_layer": 1,
    },
    "transformer_encoder": {
        "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
        "num_layers": 18,
        "hidden_size": 192,
        "inner_size": 768,
        "num_attention_heads": 8,
        "attn_score_dropout": 0.5,
        "attn_layer_dropout": 0.5,
        "ffn_dropout": 0.5,
        "hidden_act": "relu",
        "pre_ln": False,
        "pre_ln_final_layer_norm": True,
    },
    "loss": {"_target_": "nemo.collections.asr.losses.bce_loss.BCELoss", "weight": None, "reduction": "mean"},
}


def tiny_config() -> dict[str, Any]:
    """The same model with 2+2 narrow layers: same features, subsampling, heads and streaming code."""
    cfg = copy.deepcopy(FULL)
    cfg["model_defaults"] = {"fc_d_model": 64, "tf_d_model": 32}
    cfg["sortformer_modules"].update(fc_d_model=64, tf_d_model=32)
    cfg["encoder"].update(n_layers=2, d_model=64, subsampling_conv_channels=32, n_heads=4)
    cfg["transformer_encoder"].update(num_layers=2, hidden_size=32, inner_size=64, num_attention_heads=4)
    return cfg


def build(config: dict[str, Any], out: Path, seed: int = 0, output_gain: float = 8.0) -> int:
    """Build a random-weight model from `config`, save it as a `.nemo` at `out` (atomically).

    Returns the parameter count. Raises whatever NeMo raises on a bad config.
    """
    import torch
    from nemo.collections.asr.models import SortformerEncLabelModel
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = SortformerEncLabelModel(cfg=OmegaConf.create(config))
    with torch.no_grad():
        # Untrained outputs cluster near 0.55; a larger last layer spreads them over 0..1.
        model.sortformer_modules.single_hidden_to_spks.weight.mul_(output_gain)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        model.save_to(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", action="store_true", help="few narrow layers, for unit tests")
    size.add_argument("--full", action="store_true", help="the real 117M-parameter shape")
    parser.add_argument("--out", type=Path, required=True, help="where to write the .nemo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    n = build(tiny_config() if args.tiny else FULL, args.out, seed=args.seed)
    size_mb = args.out.stat().st_size / 1e6
    print(f"{args.out}: {n / 1e6:.1f}M parameters, {size_mb:.0f} MB, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
