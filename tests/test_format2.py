"""Format 2: one native file holds several wavelets. A diffusers pipeline file whose UNet is db1 and whose text
encoder is db4 becomes one native file, each layer with its own wavelet, equal to the float64 reference."""

import json

import torch
from reference import reference_delta
from safetensors.torch import save_file

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions

UNET = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE = "text_model.encoder.layers.0.self_attn.q_proj"


def test_a_pipeline_file_with_db1_unet_and_db4_text_encoder_becomes_one_native_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    spectra = {
        f"unet.{UNET}.waveft_spectrum": torch.randn(50, generator=g),
        f"text_encoder.{TE}.waveft_spectrum": torch.randn(40, generator=g),
    }
    settings = {
        "unet.wavelet_family": "db1",
        "unet.scaling": 10.0,
        "unet.random_loc_seed": 3,
        "text_encoder.wavelet_family": "db4",
        "text_encoder.scaling": 4.0,
        "text_encoder.random_loc_seed": 8,
    }
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(spectra, str(src), metadata={"lora_adapter_metadata": json.dumps(settings)})
    base = {f"unet.{UNET}.weight": (320, 320), f"text_encoder.{TE}.weight": (768, 768)}
    out = wft.save(wft.load(src, base=base), tmp_path / "native.safetensors")
    back = wft.load(out)
    assert back.metadata["waveft.format_version"] == "2"
    expected = {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": ("db1", 10.0, 3, f"unet.{UNET}"),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": (
            "db4",
            4.0,
            8,
            f"text_encoder.{TE}",
        ),
    }
    assert set(back.layers) == set(expected)
    for name, (wavelet, scaling, seed, key) in expected.items():
        layer = back.layers[name]
        assert layer.wavelet == wavelet
        positions = peft_positions(layer.shape, layer.n_coefficients, seed)
        want = reference_delta(positions, spectra[f"{key}.waveft_spectrum"].double(), layer.shape, wavelet, scaling)
        assert float((layer.delta(torch.float64) - torch.as_tensor(want)).abs().max()) < 1e-10, name
