"""`kvsieve-check` (kvsieve_vllm.cli) on the benchmark configs: what it prints is the library's own
planning, so a request's figures follow from the config, and a bounding config says so."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvsieve_vllm.cli import main

CONFIGS = Path(__file__).resolve().parents[3] / "bench" / "configs"


def _rows(text: str) -> dict[int, list[str]]:
    return {int(cells[0]): cells[1:] for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_a_bounding_config_prints_its_bound_and_chunk_wise_peaks(capsys):
    """longer-than-kv.toml: 1024 tokens kept, compressed between 1024-token chunks; one request
    holds at most the largest budget it may ask for + a block - 1 before a chunk, the chunk, and
    the rest of the SnapKV window (31) the next chunk computes with no chunk event; 6k-8k prompts
    fit 144 blocks."""
    assert main([str(CONFIGS / "longer-than-kv.toml"), "--kv-blocks", "144", "--block-size", "32", "--chunk", "1024",
                 "--lengths", "6000,8000", "--output-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "between prefill chunks: snapkv" in out
    assert "bounded: one request holds at most 2118 tokens (67 blocks)" in out, out
    # A request may ask for 12.5% of max_model_len 8256 = 1032 tokens: 1032 + 31 + 1024 + 31.
    assert 2118 == 1032 + 31 + 1024 + 31
    for prompt, (prefill_peak, kept, stock, mine, _share, batch_stock, batch_mine) in _rows(out).items():
        assert int(prefill_peak) <= 1024 + 1024, "budget + one chunk while prefilling"
        assert int(kept) <= 1024 + 32 and int(stock) == math.ceil((prompt + 256) / 32) > 144
        assert int(mine) <= math.ceil((1024 + 32 + 64) / 32)
        assert (int(batch_stock), int(batch_mine)) == (0, 3), out
    assert "Latency:" not in out, "stock vLLM cannot run these prompts at all: no batch to keep"


def test_without_prefill_the_whole_prompt_is_held_and_nothing_is_bounded(capsys):
    assert main([str(CONFIGS / "snapkv-25.toml"), "--kv-blocks", "500", "--block-size", "32",
                 "--lengths", "4096", "--output-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "between prefill chunks: nothing" in out and "unbounded:" in out
    assert _rows(out)[4096][:2] == ["4096", "1024"], out
    # More requests fit: the latency trade is named, with the cap that keeps stock's batch.
    stock, mine = (int(x) for x in _rows(out)[4096][5:7])
    assert (stock, mine) == (500 // math.ceil((4096 + 64) / 32), 1 + (500 - 128) // math.ceil((1024 + 64) / 32))
    assert f"up to {mine} requests run at once where stock vLLM runs {stock}." in out, out
    assert f"--max-num-seqs, the 'batch ... stock' column: {stock} here" in out, out


@pytest.mark.parametrize("args,fix", [(["--chunk", "0"], "--chunk"), (["--lengths", "x"], "--lengths")])
def test_bad_arguments_name_the_flag(args, fix, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(CONFIGS / "snapkv-25.toml"), *args])
    assert e.value.code == 2 and fix in capsys.readouterr().err


def test_a_selection_config_prints_the_blocks_a_decode_step_reads(capsys):
    """quest-1024.toml: nothing evicted (every request holds stock's blocks), 1,024 tokens read
    per decode step in whole 32-token blocks, and the metadata's cost for the model."""
    model = CONFIGS.parents[1] / "models" / "byte-llama-5m"
    assert main([str(CONFIGS / "quest-1024.toml"), "--model", str(model), "--kv-blocks", "1000", "--block-size",
                 "32", "--lengths", "512,1900", "--output-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "eviction: none" in out and "selection: quest" in out and "from layer 2 on" in out and "ranked by 0.5 of their keys" in out, out
    table = out[out.index("Block selection:"):]
    rows = _rows(table)
    # 512 tokens: within the budget, every block read; 1900: 32 of 60, and 32 of 62 at the end.
    assert rows[512] == ["16", "16", "100%", "18", "18"], rows
    assert rows[1900] == ["60", "32", "53%", "62", "32"], rows
    # 4 selected layers x 4 KV heads x 32 dims x min and max x 4 bytes.
    assert "4096 bytes per block = 3.9 MiB for 1000 blocks" in out, out
    assert "Select or evict" in out


def test_key_ranges_multiply_the_metadata_and_must_divide_the_block(tmp_path, capsys):
    """`selection.key_ranges = 4`: the same blocks read, 4x the metadata; 3 ranges do not divide
    a 32-token block, which the plugin refuses at start-up, so the check fails (exit 1) and says so."""
    model = CONFIGS.parents[1] / "models" / "byte-llama-5m"
    config = tmp_path / "quest-ranges.toml"
    args = ["--model", str(model), "--kv-blocks", "1000", "--block-size", "32", "--lengths", "1900"]
    for ranges, code in ((4, 0), (3, 1)):
        config.write_text((CONFIGS / "quest-1024.toml").read_text() + f"key_ranges = {ranges}\n")
        assert main([str(config), *args]) == code
        out, err = capsys.readouterr()
        assert f"{ranges} key ranges per block" in out, out
        # 4 selected layers x R ranges x 4 KV heads x 32 dims x min and max x 4 bytes.
        assert f"{4096 * ranges} bytes per block" in out, out
        if code:
            assert "selection.key_ranges = 3 does not divide the block size 32" in err, err


def test_decode_snapkv_waits_for_its_window_of_generated_queries(capsys):
    """A SnapKV decode event scores with the last 32 generated tokens' queries, so one due right
    after prefill waits until they exist (streaming cuts at the first generated token); events
    that fall due later fire on time (the ring starts recording 31 tokens ahead)."""
    from kvsieve_vllm.cli import request_profile
    from kvsieve_vllm.lib import load

    text = ('[sparsity]\npolicy = "snapkv"\nbudget_tokens = 1024\n'
            '[decode]\npolicy = "{}"\nbudget_tokens = 512\ninterval = 64\n')
    snap, stream = (request_profile(load().config_from_str(text.format(p)), 2048, 256, 32, 2048)
                    for p in ("snapkv", "streaming"))
    assert snap["kept_after_prefill"] == stream["kept_after_prefill"] == 1024
    assert stream["peak_decoding"] == 1024 + 1 and snap["peak_decoding"] == 1024 + 32, (snap, stream)
    # The long-generation configs: streaming and SnapKV decode at 512 tokens, every 256 past it,
    # hold the same at their largest (the first event once min_length, 1024 tokens, is reached).
    peaks = []
    for name in ("long-generation.toml", "decode-snapkv-512.toml"):
        assert main([str(CONFIGS / name), "--kv-blocks", "160", "--block-size", "32", "--lengths", "256",
                     "--output-tokens", "2048"]) == 0
        out = capsys.readouterr().out
        peaks.append(_rows(out)[256][3])
    assert "decode:  snapkv, budget 512 tokens, every 256 tokens past it, scored with the queries of the last 32 " \
           "generated tokens and 0.5 x each kept token's score at the event before (decode.carry)" in out, out
    assert peaks == [str(1024 // 32)] * 2, peaks
