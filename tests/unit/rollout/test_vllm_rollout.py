"""The ``vllm`` rollout backend's configuration plumbing, on CPU (vLLM itself cannot run here): the TRL arguments it
sets and ``build_config`` gets, the refusals, the missing-vllm/GPU checks before any model load, the server's
quantization check, and generation delegated to TRL's path with its vLLM log-probs as behaviour log-probs."""

import http.server
import json
import threading

import pytest
from pydantic import ValidationError

from opd_plugins.context import Sampling
from opd_plugins.errors import OPDError, RecipeError
from opd_plugins.recipe.loader import device_problems, validate_recipe
from opd_plugins.rollout import vllm as vllm_module
from opd_plugins.rollout.vllm import VLLMRollout
from opd_plugins.runs.opd import build_config
from opd_plugins.testing import RolloutContract, build_tiny_model, fake_context


class TestVLLMContract(RolloutContract):
    component = VLLMRollout


def recipe(tmp_path, rollout_params=None, **args):
    raw = {"model": {"name_or_path": "smollm2-135m-instruct"}, "data": {"task": {"name": "arithmetic"}},
           "rollout": {"name": "vllm", "params": rollout_params or {}},
           "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4, **args}},
           "output_dir": str(tmp_path / "run")}
    return validate_recipe(raw, "vllm.yaml", device_check=False)[0]


def test_colocate_maps_onto_trls_arguments(tmp_path):
    r = recipe(tmp_path, {"gpu_memory_utilization": 0.45, "tensor_parallel_size": 2})
    rollout = r.components["rollout"]
    assert rollout.trainer_args() == {"use_vllm": True, "vllm_mode": "colocate",
                                      "vllm_importance_sampling_correction": False,
                                      "vllm_gpu_memory_utilization": 0.45, "vllm_tensor_parallel_size": 2}
    cfg = build_config(r, rollout)
    assert (cfg.use_vllm, cfg.vllm_mode, cfg.vllm_gpu_memory_utilization, cfg.vllm_tensor_parallel_size) == \
        (True, "colocate", 0.45, 2)
    assert cfg.vllm_importance_sampling_correction is False  # TRL's own IS off: the shared correction applies


def test_server_maps_onto_trls_arguments(tmp_path):
    r = recipe(tmp_path, {"mode": "server", "server_host": "10.0.0.7", "server_port": 8011,
                          "quantization": "fp8_per_block"})
    rollout = r.components["rollout"]
    cfg = build_config(r, rollout)
    assert (cfg.use_vllm, cfg.vllm_mode, cfg.vllm_server_host, cfg.vllm_server_port) == (True, "server", "10.0.0.7",
                                                                                       8011)
    assert cfg.vllm_importance_sampling_correction is False and rollout.precision == "vllm_fp8_per_block"
    assert "vllm_gpu_memory_utilization" not in rollout.trainer_args()  # the server's own flags decide it


@pytest.mark.parametrize(("args", "key"), [({"use_vllm": False}, "trainer.args.use_vllm"),
                                           ({"vllm_mode": "server"}, "trainer.args.vllm_mode"),
                                           ({"vllm_importance_sampling_correction": True},
                                            "trainer.args.vllm_importance_sampling_correction")])
def test_contradicting_trainer_args_are_refused(tmp_path, args, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        recipe(tmp_path, **args)


@pytest.mark.parametrize(("params", "key", "match"), [
    ({"quantization": "fp8"}, "quantization", r"mode: colocate does not support quantization.*quantization=None.*"
                                              r"mode: server.*--quantization fp8"),
    ({"mode": "server", "gpu_memory_utilization": 0.5}, "gpu_memory_utilization",
     r"not used in mode: server.*--gpu-memory-utilization"),
    ({"mode": "server", "tensor_parallel_size": 2}, "tensor_parallel_size", "not used in mode: server"),
    ({"server_port": 9000}, "server_port", "applies to mode: server"),
])
def test_settings_the_mode_cannot_use_are_refused(tmp_path, params, key, match):
    with pytest.raises(RecipeError, match=rf"rollout\.params\.{key}: .*{match}"):
        recipe(tmp_path, params)


def test_an_unknown_quantization_is_refused_naming_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"rollout\.params\.quantization"):
        recipe(tmp_path, {"mode": "server", "quantization": "int4"})
    with pytest.raises(ValidationError):
        VLLMRollout.Params(quantization="awq")


def test_no_gpu_and_no_vllm_are_reported_before_any_model_loads(tmp_path, monkeypatch):
    r = recipe(tmp_path)
    notes = [str(p) for p in device_problems(r)]
    assert any("rollout.params.mode: vLLM needs a CUDA GPU" in n for n in notes)
    assert any("vllm is not installed" in n and "pip install 'trl[vllm]'" in n for n in notes)
    raw = {"model": {"name_or_path": "smollm2-135m-instruct"}, "data": {"task": {"name": "arithmetic"}},
           "rollout": {"name": "vllm"}, "output_dir": str(tmp_path / "run"),
           "trainer": {"args": {"per_device_train_batch_size": 4, "num_generations": 4}}}
    with pytest.raises(RecipeError, match="vLLM needs a CUDA GPU"):  # what `train` runs, before loading a model
        validate_recipe(raw, "vllm.yaml", device_check=True)
    # a GPU machine without vllm: refused by the component's own problems
    monkeypatch.setattr(vllm_module, "_cuda_available", lambda: True)
    monkeypatch.setattr(vllm_module, "vllm_installed", lambda: False)
    assert ("mode", vllm_module.VLLMRollout().problems()[0][1]) == VLLMRollout().problems()[0]
    assert "vllm package, which is not installed" in VLLMRollout().problems()[0][1]
    monkeypatch.setattr(vllm_module, "vllm_installed", lambda: True)
    assert VLLMRollout().problems() == []


def _ctx(opd_tokenizer, generate):
    return fake_context(build_tiny_model(opd_tokenizer), opd_tokenizer, trl_generate=generate)


def test_generate_delegates_to_trls_path_and_reports_its_vllm_logprobs(opd_tokenizer):
    calls = []

    def trl_generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls.append((prompt_ids, num_generations))
        return [[5, 6], [7]], [[-0.1, -0.2], [-0.3]]

    b = VLLMRollout()
    b.setup(_ctx(opd_tokenizer, trl_generate))
    out = b.generate([[1, 2], [1, 2]], Sampling(num_generations=2, step=3))
    assert calls == [([[1, 2], [1, 2]], 2)]
    assert out.completion_ids == [[5, 6], [7]] and out.behaviour_logps == [[-0.1, -0.2], [-0.3]]
    assert out.policy_version == 3


def test_generate_refuses_a_trainer_that_is_not_running_vllm(opd_tokenizer):
    b = VLLMRollout()
    with pytest.raises(OPDError, match="does not provide"):
        b.setup(fake_context(build_tiny_model(opd_tokenizer), opd_tokenizer))
    b.setup(_ctx(opd_tokenizer, lambda *a, **k: ([[5]], None)))
    with pytest.raises(OPDError, match="use_vllm is off.*trainer_args"):
        b.generate([[1, 2]], Sampling(num_generations=1))


class _Server:
    """A stand-in vLLM server answering ``/server_info`` with a given quantization."""

    def __init__(self, quantization):
        body = json.dumps({"vllm_config": {"model_config": {"quantization": quantization}}}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                ok = self.path.startswith("/server_info")
                self.send_response(200 if ok else 404)
                self.end_headers()
                self.wfile.write(body if ok else b"{}")

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("running", ["fp8_per_block", None])
def test_server_mode_checks_the_servers_quantization(opd_tokenizer, running):
    server = _Server(running)
    try:
        gen = lambda *a, **k: ([[5]], [[-0.5]])  # noqa: E731
        ok = VLLMRollout(VLLMRollout.Params(mode="server", server_host="127.0.0.1", server_port=server.port,
                                            quantization=running))
        ok.setup(_ctx(opd_tokenizer, gen))
        other = "fp8" if running is None else None
        wrong = VLLMRollout(VLLMRollout.Params(mode="server", server_host="127.0.0.1", server_port=server.port,
                                               quantization=other))
        with pytest.raises(OPDError, match=f"runs quantization: {running}, but params.quantization is {other}"):
            wrong.setup(_ctx(opd_tokenizer, gen))
        unchecked = VLLMRollout(VLLMRollout.Params(mode="server", server_host="127.0.0.1", server_port=server.port,
                                                   quantization=other, check_server=False))
        unchecked.setup(_ctx(opd_tokenizer, gen))
    finally:
        server.close()


def test_an_unreachable_server_is_named(opd_tokenizer):
    b = VLLMRollout(VLLMRollout.Params(mode="server", server_host="127.0.0.1", server_port=9))
    with pytest.raises(OPDError, match=r"could not read http://127\.0\.0\.1:9/server_info.*check_server: false"):
        b.setup(_ctx(opd_tokenizer, lambda *a, **k: ([[5]], [[-0.5]])))
