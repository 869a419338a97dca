"""AllenNLP's ELMo code, run with only its import line changed (elmojax.allennlp), gives
AllenNLP 2.10.1's own recorded ids and representations (tests/fixtures/allennlp_elmo)."""

import json
import os

import numpy as np

from conftest import ROOT
from elmojax.allennlp import Elmo, batch_to_ids

ALLENNLP = os.path.join(ROOT, "tests", "fixtures", "allennlp_elmo")
MODEL = os.path.join(ROOT, "tests", "fixtures", "bilm_tf_checkpoint")  # the record's model
OPTIONS_FILE, WEIGHT_FILE = os.path.join(MODEL, "options.json"), os.path.join(MODEL, "dump_weights.hdf5")


def test_allennlp_code_with_the_import_changed_gives_allennlps_numbers():
    with open(os.path.join(ALLENNLP, "record.json"), encoding="utf-8") as f:
        record = json.load(f)
    arrays = np.load(os.path.join(ALLENNLP, "record.npz"))
    sentences = record["sentences"]
    character_ids = batch_to_ids(sentences)
    np.testing.assert_array_equal(character_ids, arrays["char_ids"])
    for case in record["cases"]:
        # as AllenNLP's code writes it
        elmo = Elmo(OPTIONS_FILE, WEIGHT_FILE, 1, dropout=0, do_layer_norm=case["do_layer_norm"],
                    keep_sentence_boundaries=case["keep_sentence_boundaries"],
                    scalar_mix_parameters=case["scalar_mix_parameters"])
        embeddings = elmo(character_ids)
        np.testing.assert_array_equal(embeddings["mask"], arrays[case["name"] + "/mask"])
        got = np.asarray(embeddings["elmo_representations"][0])
        assert np.max(np.abs(got - arrays[case["name"]])) < 1e-5, case["name"]


def test_dropout_applies_until_eval_as_a_torch_modules_does():
    elmo = Elmo(OPTIONS_FILE, WEIGHT_FILE, 2, dropout=0.5)
    ids = batch_to_ids([["The", "cat", "sat"], ["A", "dog"]])
    first, second = elmo(ids), elmo(ids)  # training mode: a new dropout mask each call
    assert not np.array_equal(first["elmo_representations"][0], second["elmo_representations"][0])
    elmo.eval()
    again = [elmo(ids)["elmo_representations"][1] for _ in range(2)]
    np.testing.assert_array_equal(again[0], again[1])
    assert len(first["elmo_representations"]) == 2 and first["mask"].shape == (2, 3)
