"""``sharedquant inspect`` on a generated 400-expert MoE checkpoint: summary, engine rules, --fail-above, display.

The checkpoint is built with safetensors directly. Only the per-tensor scales carry
meaning (powers of two times small factors, so every ratio is exact); packed weights
and block scales are tiny placeholders, which inspect never reads.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from sharedquant.adapters.cli import main
from sharedquant.adapters.report import format_ratio

LAYERS, EXPERTS = 4, 100
S = 2.0**-15  # a realistic weight_scale_2 (global amax ~0.08)
G = 491520.0  # a realistic weight_global_scale, 2**15 * 15: G / f is exact for every factor below
FACTORS = (1.25, 1.25, 1.25, 1.25, 1.25, 2.0, 2.0, 0.5, 4.0, 0.25)


def expert_factors():
    """Pair index (layer * 100 + expert) -> up's scale over gate's: 100 mismatched pairs, two of them at 10x."""
    factors = {i: FACTORS[(i // 4) % 10] for i in range(LAYERS * EXPERTS) if i % 4 == 1}
    factors.update({201: 10.0, 397: 10.0})
    return factors


# Dense siblings, (layer, module, role) -> factor over the layer's base scale.
DENSE = {(1, "self_attn", "k_proj"): 2.0, (3, "self_attn", "v_proj"): 0.5, (2, "mlp.shared_experts", "up_proj"): 1.5}
ROLES = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp.shared_experts": ("gate_proj", "up_proj")}
MLA = ("q_a_proj", "kv_a_proj_with_mqa")


def member_factors():
    """Every member's FQN -> its scale as a factor of the base, and the members whose input scale differs."""
    members, inputs = {}, {"model.layers.0.mlp.experts.0.up_proj"}  # a pair that differs in input scale only
    factors = expert_factors()
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for expert in range(EXPERTS):
            members[f"{prefix}.mlp.experts.{expert}.gate_proj"] = 1.0
            members[f"{prefix}.mlp.experts.{expert}.up_proj"] = factors.get(layer * EXPERTS + expert, 1.0)
        for module, roles in ROLES.items():
            for role in roles:
                members[f"{prefix}.{module}.{role}"] = DENSE.get((layer, module, role), 1.0)
        for role in MLA:
            members[f"{prefix}.self_attn.{role}"] = 1.0
    return members, inputs


def write_checkpoint(directory, fmt):
    """A modelopt or compressed-tensors NVFP4 checkpoint of ``member_factors``; returns its directory."""
    members, inputs = member_factors()
    tensors = {"model.embed_tokens.weight": torch.zeros(4, 16, dtype=torch.bfloat16)}
    for fqn, factor in members.items():
        packed, block = torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 1).to(torch.float8_e4m3fn)
        input_scale = 2.0**-7 if fqn in inputs else 2.0**-8
        if fmt == "modelopt":
            tensors[f"{fqn}.weight"], tensors[f"{fqn}.weight_scale"] = packed, block
            tensors[f"{fqn}.weight_scale_2"] = torch.tensor(S * factor, dtype=torch.float32)
            tensors[f"{fqn}.input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
        else:  # compressed-tensors stores reciprocals: a member whose weight_scale_2 is f times larger stores G / f
            tensors[f"{fqn}.weight_packed"], tensors[f"{fqn}.weight_scale"] = packed, block
            tensors[f"{fqn}.weight_global_scale"] = torch.tensor(G / factor, dtype=torch.float32)
            tensors[f"{fqn}.input_global_scale"] = torch.tensor(1 / input_scale, dtype=torch.float32)
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module", params=["modelopt", "compressed-tensors"])
def moe(request, tmp_path_factory):
    return request.param, write_checkpoint(tmp_path_factory.mktemp("moe") / "ckpt", request.param)


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


EXPERT_KIND = "gate_proj/up_proj (per expert)"
KINDS = {
    # kind: (groups, mismatched, median, p99, max); nearest rank over the sorted ratios
    EXPERT_KIND: (400, 101, 1.0, 4.0, 10.0),  # 100 weight pairs + 1 input-only; 300 ones, 49 x 1.25, 30 x 2, 19 x 4, 2 x 10
    "gate_proj/up_proj": (4, 1, 1.0, 1.5, 1.5),  # the shared experts
    "q_proj/k_proj/v_proj": (4, 2, 1.0, 2.0, 2.0),
    "q_a_proj/kv_a_proj_with_mqa": (4, 0, 1.0, 1.0, 1.0),
}
E = "model.layers.{}.mlp.experts.{}.{}"
RULES = {
    # name: (members covered, affected, worst error, worst member)
    "modelopt": {
        # the gate's scale: every up of a mismatched pair is off by |1/f - 1|, worst f=0.25 (first at pair 37)
        "vllm-moe": (800, 100, 3.0, E.format(0, 37, "up_proj")),
        # the largest: the smaller member is off by ratio - 1, worst the gate of the first 10x pair (201)
        "trtllm-cutlass-moe": (800, 100, 9.0, E.format(2, 1, "gate_proj")),
        "trtllm-gen-moe": (800, 0, 0.0, None),
        "sglang-moe": (800, 0, 0.0, None),
        # q/k/v, shared gate/up, MLA: 12 + 8 + 8 members; layer 1 q, v and layer 3 v are off by 2x, layer 2 gate by 1.5x
        "vllm-dense-modelopt": (28, 4, 1.0, "model.layers.1.self_attn.q_proj"),
    },
    "compressed-tensors": {
        "vllm-moe": (800, 100, 3.0, E.format(0, 37, "up_proj")),
        # the smallest weight_scale_2: layer 1 k, layer 3 q and k are off by 1/2, layer 2 up by 1/1.5
        "vllm-dense-ct": (28, 4, 0.5, "model.layers.1.self_attn.k_proj"),
    },
}


def test_json_summary_kinds_and_rules_are_exact(moe, capsys):
    fmt, path = moe
    status, out, err = run(capsys, "inspect", path, "--json")
    report = json.loads(out)
    assert status == 1 and err == "" and report["format"] == fmt
    assert report["summary"] == {"groups": 412, "consistent": 308, "mismatched": 104, "worst_ratio": 10.0}
    kinds = {k["kind"]: (k["groups"], k["mismatched"], k["ratio_median"], k["ratio_p99"], k["ratio_max"]) for k in report["kinds"]}
    assert kinds == KINDS and [k["kind"] for k in report["kinds"]] == list(KINDS)
    experts = next(k for k in report["kinds"] if k["kind"] == EXPERT_KIND)
    assert experts["mismatched_share"] == 101 / 400
    assert [(w["parent"], w["ratio"]) for w in experts["worst"]] == [
        ("model.layers.2.mlp.experts.1", 10.0), ("model.layers.3.mlp.experts.97", 10.0), ("model.layers.0.mlp.experts.33", 4.0),
    ]  # fmt: skip
    rules = {r["name"]: (r["members"], r["affected"], r["worst_error"], r["worst_member"]) for r in report["rules"]}
    assert rules == RULES[fmt]
    assert [w["parent"] for w in report["worst_groups"]][:2] == ["model.layers.2.mlp.experts.1", "model.layers.3.mlp.experts.97"]
    assert report["fail_above"] is None and report["exceeding"] == 104 and len(report["groups"]) == 412


def test_the_summary_fits_one_screen_and_names_the_same_numbers(moe, capsys):
    fmt, path = moe
    status, out, _ = run(capsys, "inspect", path)
    lines = out.splitlines()
    assert status == 1 and len(lines) <= 30 and max(map(len, lines)) <= 160
    worst = "worst 10x in model.layers.2.mlp.experts.1"
    assert lines[-1] == f"412 fused groups, 308 consistent, 104 mismatched ({worst}); format {fmt}"
    row = next(line for line in lines if line.startswith(EXPERT_KIND)).split()
    assert row[-6:] == ["400", "101", "(25.2%)", "1x", "4x", "10x"]
    for name, (covered, affected, error, member) in RULES[fmt].items():
        rule = next(line for line in lines if line.startswith(name + " "))
        assert f" {affected} of {covered} " in rule and rule.split()[-1] == (member or "-")
        assert f" {100 * error:.3g}% " in rule or (error == 0 and " 0% " in rule)
    assert "model.layers.0.mlp.experts.5." not in out  # no per-group rows without --all


def test_fail_above_gates_the_exit_status_on_the_weight_ratio(moe, capsys):
    _, path = moe
    assert run(capsys, "inspect", path, "--fail-above", "9.99")[0] == 1
    status, out, _ = run(capsys, "inspect", path, "--fail-above", "10")
    assert status == 0 and "--fail-above 10: 0 group(s)" in out
    status, out, _ = run(capsys, "inspect", path, "--fail-above", "3.5", "--json")
    assert status == 1 and json.loads(out)["exceeding"] == 21  # 19 x 4 and 2 x 10


@pytest.mark.parametrize("value", ["0.5", "nan", "inf", "x"])
def test_fail_above_refuses_what_is_not_a_ratio(moe, capsys, value):
    _, path = moe
    status, _, err = run(capsys, "inspect", path, "--fail-above", value)
    assert status == 2 and "--fail-above" in err and "Traceback" not in err


def test_an_input_scale_mismatch_alone_fails_only_without_a_threshold(tmp_path, capsys):
    """Two experts whose weight scales agree and whose input scales differ."""
    tensors = {}
    for role, input_scale in (("gate_proj", 2.0**-8), ("up_proj", 2.0**-7)):
        fqn = f"model.layers.0.mlp.experts.0.{role}"
        tensors |= {f"{fqn}.weight": torch.zeros(2, 8, dtype=torch.uint8), f"{fqn}.weight_scale": torch.ones(2, 1).to(torch.float8_e4m3fn)}
        tensors |= {f"{fqn}.weight_scale_2": torch.tensor(S), f"{fqn}.input_scale": torch.tensor(input_scale)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert run(capsys, "inspect", tmp_path)[0] == 1
    status, out, _ = run(capsys, "inspect", tmp_path, "--fail-above", "1", "--all")
    assert status == 0 and out.splitlines()[1].split()[-4:] == ["1x", "2x", "input", "mismatch"]


def table_rows(out, parent):
    """The --all table rows of one group: its first row and the member rows after it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(parent + " "))
    rows = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        rows.append(line)
    return [row.split() for row in rows]


def test_the_table_lists_members_in_role_order_and_marks_the_shared_scale(moe, capsys):
    fmt, path = moe
    status, out, _ = run(capsys, "inspect", path, "--all")
    assert status == 1 and out.splitlines()[0].split()[:2] == ["group", "member"]
    layer3 = table_rows(out, "model.layers.3.self_attn")
    # the keys sort k_proj first; the pattern says q, k, v. Layer 3's v holds half q's weight_scale_2,
    # so q and k hold the shared (largest) one, in both layouts
    marked = ["q_proj*", "k_proj*", "v_proj"]
    assert [layer3[0][1], layer3[1][0], layer3[2][0]] == marked
    assert layer3[0][-3:] == ["2x", "1x", "MISMATCH"]  # the weight ratio, then the input ratio in its own column
    expert = table_rows(out, "model.layers.0.mlp.experts.0")
    assert [expert[0][1], expert[1][0]] == ["gate_proj", "up_proj"] and expert[0][-4:] == ["1x", "2x", "input", "mismatch"]
    groups = json.loads(run(capsys, "inspect", path, "--json")[1])["groups"]
    attention = next(g for g in groups if g["parent"] == "model.layers.3.self_attn")
    assert [m["name"].rsplit(".", 1)[1] for m in attention["members"]] == ["q_proj", "k_proj", "v_proj"]
    assert [m["shared"] for m in attention["members"]] == [m.endswith("*") for m in marked]


def test_no_fused_group_is_said_in_words(tmp_path, capsys):
    fqn = "model.layers.0.mlp.down_proj"
    save_file({f"{fqn}.weight": torch.zeros(2, 8, dtype=torch.uint8), f"{fqn}.weight_scale": torch.ones(2, 1).to(torch.float8_e4m3fn),
               f"{fqn}.weight_scale_2": torch.tensor(S)}, tmp_path / "model.safetensors")  # fmt: skip
    for argv in ([], ["--all"]):
        status, out, _ = run(capsys, "inspect", tmp_path, *argv)
        assert status == 0 and out == "no fused groups found (modelopt format)\n"


@pytest.mark.parametrize(
    ("ratio", "text"),
    [(1.0, "1x"), (1 + 2**-23, "1+1.2e-07x"), (1.00074, "1+7.4e-04x"), (2.2236, "2.224x"), (10.0, "10x"),
     (3e7, "3.000e+07x"), (float("inf"), "overflow")],
)  # fmt: skip
def test_ratios_print_sensibly_at_every_scale(ratio, text):
    assert format_ratio(ratio) == text


def test_a_one_ulp_mismatch_of_tiny_scales_does_not_print_as_one(tmp_path, capsys):
    """Subnormal fp32 scales one ulp apart: the ratio is 2, and the scales print as themselves, not 0."""
    tensors = {}
    for role, scale in (("q_proj", 2.0**-149), ("k_proj", 2.0**-148)):
        tensors[f"attn.{role}.weight_quantizer._global_amax"] = torch.tensor(scale, dtype=torch.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    status, out, _ = run(capsys, "inspect", tmp_path, "--all")
    rows = table_rows(out, "attn")
    assert status == 1 and rows[0][2:4] == ["1.40130e-45", "2x"] and rows[1] == ["k_proj*", "2.80260e-45"]
    assert "inf" not in out and "0.0000" not in out
