"""WaveFT in ComfyUI's own Train LoRA node (algorithm "WaveFT", FORMAT.md extension 4), in-process on the tiny
SD1.5: the stock TrainLoraNode -> SaveLoRA -> stock LoraLoader (and Load WaveFT) give the trained model's weights
bit for bit, the layers are PEFT-positioned db1 WaveFT (checked against PyWavelets in float64), and resuming
through `existing_lora` continues the same run."""

import inspect
import shutil
import sys

import pytest
import torch
from reference import reference_delta

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions
from waveft_core.files import fileformat

DEFAULTS = dict(
    batch_size=1,
    steps=4,
    grad_accumulation_steps=1,
    learning_rate=1e-3,
    rank=1,
    optimizer="AdamW",
    loss_function="MSE",
    seed=3,
    training_dtype="fp32",
    lora_dtype="fp32",
    quantized_backward=False,
    algorithm="WaveFT",
    gradient_checkpointing=False,
    checkpoint_depth=1,
    offloading=False,
    existing_lora="[None]",
    bucket_mode=False,
    bypass_mode=False,
)


@pytest.fixture(scope="module")
def sd15(checkpoint_state, tmp_path_factory):
    """The tiny SD1.5 loaded from a file, as Load Checkpoint does (0.33's trainer reloads it from there)."""
    import comfy.sd
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(checkpoint_state, str(path))
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    return model, clip, vae


@pytest.fixture(scope="module")
def data(sd15):
    _, clip, _ = sd15
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)) * 0.5}
    return latent, cond


@pytest.fixture
def output_dir(tmp_path):
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(before)


def stock_train(model, data, monkeypatch, **over):
    """Run the host's TrainLoraNode as its executor would. Returns (lora dict, steps, {weight key: the weight
    function the run trained}, and the MODEL where the host returns one (0.8)); the weight functions are taken
    from the run's own add_weight_wrapper calls, so they are the trained model's, on every host."""
    import comfy.model_patcher
    from comfy_extras.nodes_train import TrainLoraNode

    wrappers = {}
    original = comfy.model_patcher.ModelPatcher.add_weight_wrapper

    def record(self, name, function):
        wrappers[name] = function
        return original(self, name, function)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "add_weight_wrapper", record)
    latent, cond = data
    accepted = inspect.signature(TrainLoraNode.execute).parameters
    kw = {k: [v] for k, v in {**DEFAULTS, **over}.items() if k in accepted}
    with torch.inference_mode():
        out = TrainLoraNode.execute(model=[model], latents=[latent], positive=[cond], **kw)
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "add_weight_wrapper", original)
    result = list(out.result if hasattr(out, "result") else out)
    trained_model = result.pop(0) if not isinstance(result[0], dict) else None  # 0.8 returns the MODEL first
    lora, _, steps = result
    return lora, steps, wrappers, trained_model


def save_lora(lora, steps, output_dir, loras_dir):
    """SaveLoRA writes into output/; the stock loaders read models/loras (a user moves the file there)."""
    from comfy_extras.nodes_train import SaveLoRA

    with torch.inference_mode():
        SaveLoRA.execute(lora, "loras/stock_waveft", steps)
    (written,) = (output_dir / "loras").glob("stock_waveft_*.safetensors")
    shutil.copy(written, loras_dir / written.name)
    return written.name


def trained_weights(model, wrappers):
    """Every wrapped weight as the trained model computes it in its forward, in fp32."""
    sd = model.model.state_dict()
    with torch.no_grad():
        return {key: fn(sd[key].detach().float().clone()).float() for key, fn in wrappers.items()}


def test_waveft_is_an_algorithm_of_the_stock_node(pack):
    from comfy_extras.nodes_train import TrainLoraNode

    schema = TrainLoraNode.define_schema()
    algorithm = next(i for i in schema.inputs if getattr(i, "id", None) == "algorithm")
    assert "WaveFT" in algorithm.options


def test_stock_train_save_and_load_lora_give_the_trained_weights_exactly(
    pack, sd15, data, monkeypatch, output_dir, loras_dir, waveft_dir
):
    from host_tools import patched_weights

    from nodes import LoraLoader

    model, clip, _ = sd15
    lora, steps, wrappers, trained_model = stock_train(model, data, monkeypatch)
    assert steps == 4
    layouts = [k for k in lora if k.endswith(".waveft_layout")]
    convs = [
        k
        for k in layouts
        if lora[k.replace(".waveft_layout", ".spectrum")].numel()
        and model.model.state_dict()[k.replace(".waveft_layout", ".weight")].dim() == 4
    ]
    assert layouts and convs, "every 2-D and 4-D weight is trained as WaveFT (convolutions as m x n matrices)"
    assert any(k.endswith(".diff_b") for k in lora)  # the host's own full diffs of biases (and norms)
    # rank 1: as many coefficients as a rank-1 LoRA, at PEFT's positions for seed 777
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    w = model.model.state_dict()[key + ".weight"]
    assert lora[key + ".spectrum"].numel() == w.shape[0] + w.shape[1]
    assert lora[key + ".spectrum"].abs().sum() > 0, "the layer was trained"

    name = save_lora(lora, steps, output_dir, loras_dir)
    expected = trained_weights(model, wrappers)
    if trained_model is not None:  # 0.8 returns the trained MODEL: its wrappers are the ones recorded
        assert set(trained_model.weight_wrapper_patches) == set(wrappers)
    with torch.inference_mode():
        (loaded, _) = LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    got = patched_weights(loaded, list(expected))
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, f"{len(differ)} of {len(expected)} weights differ from the trained model, e.g. {differ[:3]}"
    assert not torch.equal(got[key + ".weight"], w.float())

    # the same file through Load WaveFT (it lists WaveFT files among the LoRAs)
    listed = "loras/" + name
    assert listed in pack.nodes.loader.list_adapters()
    loaded2, _ = pack.nodes.loader.WaveFTLoader().load(model, clip, listed, 1.0, 1.0)["result"]
    got2 = patched_weights(loaded2, list(expected))
    assert all(torch.equal(got2[k], expected[k]) for k in expected)

    # the math, against PyWavelets in float64: db1, scaling 25, PEFT's positions for seed 777
    spectrum = lora[key + ".spectrum"].double()
    ref = torch.from_numpy(
        reference_delta(
            peft_positions(tuple(w.shape), spectrum.numel(), 777).numpy(), spectrum.numpy(), tuple(w.shape), "db1", 25.0
        )
    )
    torch.testing.assert_close(got[key + ".weight"].double() - w.double(), ref, rtol=1e-5, atol=1e-6)


def test_bf16_layout_survives_and_waveft_layers_stay_exact(pack, sd15, data, monkeypatch, output_dir, loras_dir):
    """lora_dtype bf16 (the node's default): every parameter is cast, the layout must still read back."""
    from host_tools import patched_weights

    from nodes import LoraLoader

    model, clip, _ = sd15
    lora, steps, wrappers, _ = stock_train(model, data, monkeypatch, lora_dtype="bf16", steps=2)
    assert all(t.dtype == torch.bfloat16 for t in lora.values())
    name = save_lora(lora, steps, output_dir, loras_dir)
    adapter = wft.load(loras_dir / name)
    assert len(adapter.layers) == sum(k.endswith(".waveft_layout") for k in lora)
    waveft_keys = [k for k in wrappers if k[: -len(".weight")] in adapter.layers]
    expected = trained_weights(model, {k: wrappers[k] for k in waveft_keys})
    with torch.inference_mode():
        (loaded, _) = LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    got = patched_weights(loaded, waveft_keys)
    assert all(torch.equal(got[k], expected[k]) for k in waveft_keys)


def test_resume_through_existing_lora_continues_the_run(pack, sd15, data, monkeypatch, output_dir, loras_dir):
    model, _, _ = sd15
    lora, steps, _, _ = stock_train(model, data, monkeypatch, steps=3)
    name = save_lora(lora, steps, output_dir, loras_dir)
    assert "_3_steps_" in name
    import comfy.weight_adapter

    starts = {}
    original = comfy.weight_adapter.adapter_maps["WaveFT"].to_train

    def to_train(self):
        module = original(self)
        starts[id(module)] = module.spectrum.detach().clone()
        return module

    monkeypatch.setattr(comfy.weight_adapter.adapter_maps["WaveFT"], "to_train", to_train)
    resumed, steps2, wrappers, _ = stock_train(model, data, monkeypatch, steps=2, existing_lora=name)
    assert steps2 == 5
    layouts = [k for k in lora if k.endswith(".waveft_layout")]
    assert len(starts) == len(layouts), "every WaveFT layer continued from the file (to_train), none started anew"
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    module = wrappers[key + ".weight"]
    assert torch.equal(starts[id(module)].float(), lora[key + ".spectrum"].float())  # started where it stopped
    assert not torch.equal(resumed[key + ".spectrum"], lora[key + ".spectrum"])  # and went on
    assert torch.equal(resumed[key + ".waveft_layout"], lora[key + ".waveft_layout"])  # same positions


def test_a_damaged_layout_is_refused_naming_the_key(pack, sd15, data, monkeypatch, output_dir, loras_dir):
    model, _, _ = sd15
    lora, *_ = stock_train(model, data, monkeypatch, steps=1)
    key = next(k for k in lora if k.endswith(".waveft_layout"))
    broken = dict(lora)
    broken[key] = broken[key].clone()
    broken[key][-1] += 1  # the positions' checksum no longer fits
    with pytest.raises(wft.WaveFTFileError, match=key.replace(".", r"\.") + ".*checksums differ"):
        fileformat.adapter_from_tensors(broken, {}, "x.safetensors")
    with pytest.raises(ValueError, match="checksums differ"):  # no silent no-op: the stock loader's node fails
        pack.nodes.host.WaveFTAdapter.load(key[: -len(".waveft_layout")], broken)


@pytest.mark.host_feature("bypass")
def test_bypass_mode_trains_through_h(pack, sd15, data, monkeypatch, output_dir, loras_dir):
    """0.33's bypass training adds h(x) to each layer's output instead of wrapping the weight: the same ΔW."""
    from host_tools import patched_weights

    from nodes import LoraLoader

    model, clip, _ = sd15
    calls = []
    cls = type(pack.nodes.host.WaveFTAdapter.create_train(torch.zeros(4, 4), 1))
    stock = sys.modules[cls.__module__]
    original_h = cls.h

    def h(self, x, base_out=None):
        calls.append(self)
        return original_h(self, x, base_out)

    monkeypatch.setattr(cls, "h", h)
    lora, steps, _, _ = stock_train(model, data, monkeypatch, steps=2, bypass_mode=True)
    assert calls and all(isinstance(m, cls) for m in calls)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert lora[key + ".spectrum"].abs().sum() > 0
    name = save_lora(lora, steps, output_dir, loras_dir)
    layer = stock.stock_layer(key, lora)
    w = model.model.state_dict()[key + ".weight"]
    with torch.inference_mode():
        (loaded, _) = LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    got = patched_weights(loaded, [key + ".weight"])[key + ".weight"]
    torch.testing.assert_close(got, w.float() + layer.delta(torch.float32), rtol=0, atol=1e-6)
