"""Diffusers names of the DiT families the host's key map lacks or places wrong (waveft_core/names/dit.py); the
end-to-end proof against real diffusers models is tests/host/test_dit_names_host.py."""

from waveft_core.names.dit import Heads, diffusers_key_map, merge_into


def test_grouped_kv_heads_take_their_own_rows_at_full_lumina2_size():
    # Lumina 2: 2304 wide, 24 query heads and 8 key/value heads of 96: q 2304 rows, k and v 768 each
    key = "diffusion_model.layers.3.attention.qkv.weight"
    kmap = diffusers_key_map("lumina2", {key: (3840, 2304)}, Heads(24, 8, 96))
    for spelling in ("attn", "attention"):  # diffusers' Lumina 2 names, and the Z-Image names the host gives it
        assert kmap[f"layers.3.{spelling}.to_q"] == (key, (0, 0, 2304))
        assert kmap[f"layers.3.{spelling}.to_k"] == (key, (0, 2304, 768))
        assert kmap[f"layers.3.{spelling}.to_v"] == (key, (0, 3072, 768))


def test_a_fused_weight_without_head_counts_gets_no_rows():
    assert diffusers_key_map("lumina2", {"diffusion_model.layers.0.attention.qkv.weight": (3840, 2304)}, None) == {}


def test_wan_and_ltxv_names():
    wan = diffusers_key_map(
        "wan_2.2",
        {
            "diffusion_model.blocks.7.cross_attn.o.weight": (5120, 5120),
            "diffusion_model.blocks.0.ffn.0.weight": (13824, 5120),
        },
    )
    assert wan == {
        "blocks.7.attn2.to_out.0": "diffusion_model.blocks.7.cross_attn.o.weight",
        "blocks.0.ffn.net.0.proj": "diffusion_model.blocks.0.ffn.0.weight",
    }
    ltxv = diffusers_key_map(
        "ltxv",
        {
            "diffusion_model.patchify_proj.weight": (2048, 128),
            "diffusion_model.transformer_blocks.2.attn1.to_q.weight": (2048, 2048),
        },
    )
    assert ltxv == {
        "proj_in": "diffusion_model.patchify_proj.weight",
        "transformer_blocks.2.attn1.to_q": "diffusion_model.transformer_blocks.2.attn1.to_q.weight",
    }


def test_families_with_a_right_host_map_get_nothing():
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert diffusers_key_map("flux1", {key: (9216, 3072)}, Heads(24, 24, 128)) == {}


def test_hunyuan_video_single_block_rows_after_qkv_are_the_mlp():
    key = "diffusion_model.single_blocks.4.linear1.weight"
    kmap = diffusers_key_map("hunyuan_video", {key: (3072 * 7, 3072)}, Heads(24, 24, 128))
    assert kmap["single_transformer_blocks.4.attn.to_v"] == (key, (0, 6144, 3072))
    assert kmap["single_transformer_blocks.4.proj_mlp"] == (key, (0, 9216, 12288))


def test_an_entry_replaces_the_hosts_value_under_every_spelling_the_host_lists():
    wrong, right = ("w", (0, 2304, 2304)), ("w", (0, 2304, 768))
    host = {
        "layers.0.attention.to_k": wrong,
        "transformer.layers.0.attention.to_k": wrong,
        "lycoris_layers_0_attention_to_k": wrong,
        "other": "x",
    }
    merged = merge_into(host, {"layers.0.attention.to_k": right})
    assert merged == {
        "layers.0.attention.to_k": right,
        "transformer.layers.0.attention.to_k": right,
        "lycoris_layers_0_attention_to_k": right,
        "other": "x",
    }
