"""Coverage: decoder language models compile, and every dimension a model allows is dynamic."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import qcompile
from qcompile.ir.graph import STATEFUL_CALLS
from tests.models import SentenceEmbedder, docstring_sentences, load_minilm, minilm_inputs, resnet18

DECODERS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64)),
}


def _ids(batch, length, seed):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_a_decoder_lm_compiles_and_runs_at_new_batch_sizes_and_lengths(name):
    torch.manual_seed(0)
    model = DECODERS[name]().eval()
    calibration = [{"input_ids": _ids(2, 16, i), "use_cache": False} for i in range(3)]
    qm = qcompile.compile(model, calibration_data=calibration, progress=False)
    # transformers builds the causal mask under vmap: its nesting calls must survive clean-up
    calls = [n.target for n in qm.graph_module.graph.nodes if n.op == "call_function"]
    assert sum(target in STATEFUL_CALLS for target in calls) > 0
    assert sum(n.precision == "int8" for n in qm.report.nodes) >= 8  # every projection and MLP linear
    for batch, length in ((2, 16), (3, 9), (1, 24)):
        ids = _ids(batch, length, 100 + length)
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
            actual = qm(input_ids=ids, use_cache=False).logits
        assert actual.shape == expected.shape
        cosine = torch.nn.functional.cosine_similarity(actual.flatten(1), expected.flatten(1))
        assert cosine.min() > 0.98, (batch, length, cosine)


def test_dead_code_elimination_keeps_the_vmap_nesting_calls():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(torch._functorch.predispatch._vmap_increment_nesting, (2, "error"))
    graph.call_function(torch._functorch.predispatch._vmap_decrement_nesting, ())
    graph.output(graph.call_function(torch.ops.aten.relu.default, (x,)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert qcompile.remove_dead_nodes(gm) == 0


def test_minilm_compiled_at_one_length_runs_at_others():
    model, tokenizer = load_minilm()
    embedder = SentenceEmbedder(model).eval()
    sentences = docstring_sentences(24)
    calibration = [minilm_inputs(tokenizer, sentences[i:i + 8], length=128) for i in range(0, 24, 8)]
    qm = qcompile.compile(embedder, calibration_data=calibration, progress=False)
    assert "every input dimension is dynamic" in qm.report.notes
    for length in (64, 37, 128):
        batch = minilm_inputs(tokenizer, docstring_sentences(5, skip=40), length=length)
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(qm(**batch), embedder(**batch))
        assert cosine.min() > 0.99, (length, cosine)


def test_an_image_model_runs_at_another_image_size_and_static_dimensions_are_reported():
    model = resnet18()
    g = torch.Generator().manual_seed(0)
    qm = qcompile.compile(model, calibration_data=[(torch.randn(2, 3, 64, 64, generator=g),) for _ in range(2)],
                          progress=False)
    assert any(note.startswith("input dimensions kept static") and "x[1]=3" in note for note in qm.report.notes)
    x = torch.randn(2, 3, 96, 80, generator=g)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qm(x), model(x))
    assert cosine.min() > 0.98
    linear = qcompile.compile(torch.nn.Linear(16, 4), calibration_data=[(torch.randn(4, 16),)], progress=False)
    assert any("x[1]=16" in note or "input[1]=16" in note for note in linear.report.notes)


class AudioTagger(torch.nn.Module):
    """conv1d front end -> GRU -> LSTM with a projection -> linear head, and a transposed
    convolution: weight ops of every kind the report accounts for."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(4, 16, 3, padding=1)
        self.gru = torch.nn.GRU(16, 16, batch_first=True)
        self.lstm = torch.nn.LSTM(16, 16, batch_first=True, proj_size=8)
        self.up = torch.nn.ConvTranspose1d(8, 4, 2, stride=2)
        self.head = torch.nn.Linear(8, 5)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.conv(x)).transpose(1, 2)
        h, _ = self.gru(h)
        h, _ = self.lstm(h)
        return self.head(h[:, -1]) + self.up(h.transpose(1, 2)).mean()


def test_every_weight_op_is_reported_int8_or_float_with_its_reason():
    g = torch.Generator().manual_seed(0)
    model = AudioTagger()
    qm = qcompile.compile(model, calibration_data=[(torch.randn(2, 4, 20, generator=g),) for _ in range(3)],
                          progress=False)
    nodes: dict[str, list] = {}
    for n in qm.report.nodes:
        nodes.setdefault(n.op, []).append(n)
    # conv1d runs as a 2-D convolution; the GRU's input product is a linear, its recurrence float
    assert [n.precision for n in nodes["conv2d"]] == ["int8"] and nodes["conv2d"][0].module.startswith("conv ")
    assert [n.precision for n in nodes["linear"]] == ["int8", "int8"]  # the GRU's input product, the head
    assert "fused fp32 recurrence" in nodes["gru_recurrence"][0].detail
    # an LSTM with a projection and a transposed convolution have no kernel: float, with the reason
    for op in ("lstm", "conv_transpose1d"):
        (node,) = nodes[op]
        assert node.precision == "float" and f"no int8 kernel for '{op}'" in node.detail, op
    # export fixes the recurrent layers' length; the report says so, and the batch stays dynamic
    assert any("x[2]=20" in note for note in qm.report.notes)
    x = torch.randn(3, 4, 20, generator=g)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qm(x), model(x)).min() > 0.99
