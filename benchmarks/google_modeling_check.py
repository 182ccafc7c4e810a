"""A model folder written by `bertkit convert --to google`, run by Google's own modeling.py, against bertkit.

    pip install tensorflow-cpu==2.20.0 tf-keras==2.20.1          # in a venv of its own: no dependency of bertkit
    git clone https://github.com/google-research/bert /tmp/bert    # Google's code: modeling.py is all it reads
    TF_USE_LEGACY_KERAS=1 python benchmarks/google_modeling_check.py MODEL_DIR --modeling /tmp/bert/modeling.py

The model is converted to Google's layout in a temporary folder, Google's `BertModel` is built from its
bert_config.json in a TensorFlow 1 graph (tf.compat.v1; `tf.layers` needs tf-keras under TensorFlow 2.16+), every
variable is loaded from the written checkpoint with Google's own `get_assignment_map_from_checkpoint`, and its
sequence and pooled outputs on a few sentences are compared with bertkit's on the original folder. modeling.py
was written for TensorFlow 1: its one call into `tf.contrib` (layer_norm, gone from TensorFlow 2) is given a
stand-in that creates the same two variables (`LayerNorm/beta`, `LayerNorm/gamma`) and normalises with the same
epsilon (1e-12). Two readings: Google's GELU as its code computes it (the tanh approximation, in the last version
of modeling.py), and the erf GELU that bertkit and transformers compute for `hidden_act: gelu`, which isolates the
weights: a wrong name, orientation or missing variable shows there. Then the other way: TensorFlow's own Saver
writes the graph's variables as a checkpoint, which bertkit reads back and must run as the original folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import types
from pathlib import Path

SENTENCES = ["The cat sat on the mat.", "A much longer sentence, with commas, numbers like 42 and more words.",
             "Short one"]


def load_modeling(path: Path, tf, gelu: str) -> types.ModuleType:
    """Google's modeling.py as a module, on tf.compat.v1, with layer_norm given back and the GELU chosen."""

    def layer_norm(inputs, begin_norm_axis=-1, begin_params_axis=-1, scope=None):  # tf.contrib.layers' variables
        with tf.variable_scope(scope or "LayerNorm"):
            width = inputs.shape[-1]
            beta = tf.get_variable("beta", [width], initializer=tf.zeros_initializer())
            gamma = tf.get_variable("gamma", [width], initializer=tf.ones_initializer())
            mean, variance = tf.nn.moments(inputs, [-1], keepdims=True)
            return tf.nn.batch_normalization(inputs, mean, variance, beta, gamma, 1e-12)

    tf.contrib = types.SimpleNamespace(layers=types.SimpleNamespace(layer_norm=layer_norm))
    source = path.read_text().replace("import tensorflow as tf", "import tensorflow.compat.v1 as tf")
    module = types.ModuleType("modeling")
    exec(compile(source, str(path), "exec"), module.__dict__)
    if gelu == "erf":
        module.gelu = lambda x: 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))
    return module


def google_outputs(modeling_py: Path, folder: Path, batch: dict, gelu: str, save_to: Path | None = None):
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()
    tf.reset_default_graph()
    modeling = load_modeling(modeling_py, tf, gelu)
    config = modeling.BertConfig.from_json_file(str(folder / "bert_config.json"))
    model = modeling.BertModel(config=config, is_training=False, input_ids=tf.constant(batch["input_ids"]),
                               input_mask=tf.constant(batch["attention_mask"]),
                               token_type_ids=tf.constant(batch["token_type_ids"]), use_one_hot_embeddings=False)
    variables = tf.trainable_variables()
    checkpoint = str(folder / "bert_model.ckpt")
    assignment, _ = modeling.get_assignment_map_from_checkpoint(variables, checkpoint)
    tf.train.init_from_checkpoint(checkpoint, assignment)
    with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        sequence, pooled = session.run([model.get_sequence_output(), model.get_pooled_output()])
        if save_to is not None:  # the other way: a checkpoint TensorFlow's own Saver writes, for bertkit to read
            save_to.mkdir()
            for name in ("bert_config.json", "vocab.txt"):
                (save_to / name).write_bytes((folder / name).read_bytes())
            tf.train.Saver().save(session, str(save_to / "bert_model.ckpt"), write_meta_graph=False)
    return sequence, pooled, len(variables), len(assignment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a bertkit or transformers model folder with a pooler")
    parser.add_argument("--modeling", required=True, help="Google's modeling.py (google-research/bert)")
    parser.add_argument("--out", help="write the readings here as JSON")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import torch

    from bertkit import BertModel, Tokenizer
    from bertkit.tf_checkpoint import ConvertConfig, convert

    tokenizer = Tokenizer.from_pretrained(args.model_dir)
    batch = {k: v.numpy() for k, v in tokenizer.encode_batch(SENTENCES, return_tensors="pt").items()}
    ours = BertModel.from_pretrained(args.model_dir).eval()
    with torch.no_grad():
        out = ours(**{k: torch.from_numpy(v) for k, v in batch.items()})
    real = batch["attention_mask"].astype(bool)  # padding's rows: bertkit leaves them out of the computation
    readings = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "google"
        convert(ConvertConfig(model_dir=args.model_dir, out=str(folder), to="google"))
        saved = Path(tmp) / "saved-by-tensorflow"
        for gelu in ("erf", "tanh"):
            sequence, pooled, variables, loaded = google_outputs(Path(args.modeling), folder, batch, gelu,
                                                                 saved if gelu == "erf" else None)
            readings[gelu] = {
                "variables": variables, "loaded_from_checkpoint": loaded,
                "max_abs_diff_sequence": float(np.abs(sequence[real] - out.last_hidden_state.numpy()[real]).max()),
                "max_abs_diff_pooled": float(np.abs(pooled - out.pooler_output.numpy()).max()),
            }
            print(f"GELU {gelu}: {loaded}/{variables} variables loaded; max |difference| from bertkit: sequence "
                  f"{readings[gelu]['max_abs_diff_sequence']:.2e}, pooled {readings[gelu]['max_abs_diff_pooled']:.2e}")
        back = BertModel.from_pretrained(saved).eval()
        with torch.no_grad():
            again = back(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
        readings["read_back"] = {"max_abs_diff_sequence": float((again - out.last_hidden_state)[real].abs().max())}
        print("TensorFlow's Saver -> bertkit: max |difference| from the original "
              f"{readings['read_back']['max_abs_diff_sequence']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model_dir": args.model_dir, "sentences": SENTENCES, **readings},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
