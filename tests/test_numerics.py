"""One Numerics value reaches every product: with Numerics("highest", "bfloat16") every matrix
product and convolution of the training step (sampled and full softmax, gradients included),
the eval step, the inference embedding and scoring runs with precision HIGHEST on bfloat16
operands, as their jaxprs show."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from elmojax import data
from elmojax.infer.bidirectional_lm import make_distinct_embed_fn, make_embed_fn
from elmojax.infer.scoring import make_log_prob_fn
from elmojax.model import softmax
from elmojax.model.bilm import BiLM, zero_state
from elmojax.model.char_ids import distinct_tokens
from elmojax.model.numerics import Numerics
from elmojax.train import config as config_lib
from elmojax.train import trained_models
from elmojax.train import trainer as trainer_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # noqa: E402
from conftest import padded_vocab_file  # noqa: E402

HIGHEST_BF16 = Numerics("highest", "bfloat16")
PRODUCTS = ("dot_general", "conv_general_dilated")


def _subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def products(jaxpr):
    """Every dot_general and conv_general_dilated of a jaxpr and the jaxprs inside it (jit,
    scan, while, cond, custom_vjp...)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in PRODUCTS:
            yield eqn
        for value in eqn.params.values():
            for inner in _subjaxprs(value):
                yield from products(inner)


def _highest(precision) -> bool:
    precisions = precision if isinstance(precision, tuple) else (precision,)
    return all(p == lax.Precision.HIGHEST for p in precisions)


def misses(fn, *args) -> tuple[int, list[str]]:
    """The number of products of fn(*args), and those not at precision HIGHEST on bfloat16 operands."""
    # a jitted step is traced as it is compiled (with its compiler options), other functions under make_jaxpr
    closed = fn.trace(*args).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args)
    found = list(products(closed.jaxpr))
    wrong = [f"{eqn.primitive.name} of {[str(v.aval) for v in eqn.invars]} at {eqn.params.get('precision')}"
             for eqn in found
             if not _highest(eqn.params.get("precision"))
             or any(v.aval.dtype != jnp.bfloat16 for v in eqn.invars)]
    return len(found), wrong


def assert_every_product(fn, *args, at_least: int = 1):
    n, wrong = misses(fn, *args)
    assert n >= at_least, f"{n} products found"
    assert not wrong, wrong


def test_the_checker_finds_a_plain_product():
    numerics = HIGHEST_BF16
    x, y = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert misses(lambda x, y: numerics.einsum("nk,kd->nd", x, y), x, y) == (1, [])
    n, wrong = misses(lambda x, y: numerics.einsum("nk,kd->nd", x, y) + jnp.dot(x, y), x, y)
    assert n == 2 and len(wrong) == 1 and "float32" in wrong[0]
    # the gradients' products too
    assert misses(jax.grad(lambda x, y: numerics.einsum("nk,kd->nd", x, y).sum(), argnums=(0, 1)), x, y) == (3, [])
    n, wrong = misses(jax.grad(lambda x, y: jnp.dot(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16),
                                                    precision="highest", preferred_element_type=jnp.float32).sum(),
                               argnums=(0, 1)), x, y)
    assert n == 3 and len(wrong) == 2  # autodiff's transposes take the float32 cotangent


def _trainer(inputs: str, tmp_path, **train):
    config = tiny.get_config(inputs)
    config.train.update(n_negative_samples_batch=4, unroll_steps=2, batch_size=2,
                        matmul_precision="highest", compute_dtype="bfloat16", **train)
    config.data.vocab_file = padded_vocab_file(str(tmp_path), 256)
    vocab = trained_models.load_vocab(config)
    trainer = trainer_lib.Trainer(config, vocab.size)
    assert trainer.settings.numerics == HIGHEST_BF16 and trainer.model.numerics == HIGHEST_BF16
    dataset = data.make_dataset(config_lib.streams(config), vocab, config.data.train_prefix, 2, 2, test=False)
    batch = trainer.put_batch(next(dataset.iter_batches()))
    return trainer, trainer.create_state(jax.random.PRNGKey(0)), batch


@pytest.mark.parametrize("inputs,sample_softmax", [("chars", True), ("chars", False), ("words", True)])
def test_the_training_and_eval_steps_take_the_numerics(inputs, sample_softmax, tmp_path):
    trainer, state, batch = _trainer(inputs, tmp_path, sample_softmax=sample_softmax)
    # forward and backward: CNN, highway, LSTM input products, recurrence, softmax; and their gradients
    assert_every_product(trainer.train_step, state, batch, at_least=10)
    assert_every_product(trainer.eval_step, state.params, state.lstm_state, batch, at_least=5)


def test_the_full_softmax_loss_takes_the_numerics():
    table = softmax.SoftmaxTable(jnp.ones((7, 4)), jnp.zeros(7))
    inputs, labels = jnp.ones((3, 4)), jnp.array([0, 1, 2])
    assert_every_product(lambda x: softmax.full_softmax_loss(table, x, labels, numerics=HIGHEST_BF16).sum(), inputs)
    assert_every_product(jax.grad(lambda x: softmax.full_softmax_loss(table, x, labels, numerics=HIGHEST_BF16).sum()),
                         inputs, at_least=2)


@pytest.fixture(scope="module")
def inference_model():
    config = tiny.get_config("chars")
    options = config_lib.bilm_options(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 60, size=(2, 5, 10)), jnp.int32)
    params = BiLM(options).init(jax.random.PRNGKey(0), ids, zero_state(options, 2))["params"]
    return options, params, ids


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # 1: the input products a step at a time
def test_the_inference_embedding_takes_the_numerics(inference_model, chunk_bytes):
    options, params, ids = inference_model
    model = BiLM(options, numerics=HIGHEST_BF16, lstm_input_chunk_bytes=chunk_bytes)
    assert_every_product(make_embed_fn(model), params, ids, None, at_least=5)
    distinct, index = distinct_tokens(np.asarray(ids))
    assert_every_product(make_distinct_embed_fn(model), params, ids, distinct, None, index, None, at_least=5)


def test_scoring_takes_the_numerics(inference_model, monkeypatch):
    options, params, ids = inference_model
    weights, biases = jnp.ones((11, options.projection_dim)), jnp.zeros(11)
    targets = jnp.zeros(ids.shape[:2], jnp.int32)
    log_prob_fn = make_log_prob_fn(BiLM(options, numerics=HIGHEST_BF16))
    assert_every_product(log_prob_fn, params, weights, biases, ids, targets, targets, at_least=5)

    # a full softmax with a plain product would be found
    def plain_logits(self, inputs, ids, subscripts, numerics):
        return jnp.einsum(subscripts, inputs, self.weights) + self.biases

    monkeypatch.setattr(softmax.SoftmaxTable, "logits", plain_logits)
    n, wrong = misses(make_log_prob_fn(BiLM(options, numerics=HIGHEST_BF16)), params, weights, biases, ids, targets,
                      targets)
    assert len(wrong) == 2  # the two directions' softmax products
