"""`bertkit` and its subcommands. Thin: parse arguments, call one library function, print the result.

Bad input raises `BertkitError`; the CLI prints it in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

from bertkit.errors import BertkitError

# ---------------------------------------------------------------------------------------------------------------
# Flags generated from the library's dataclasses, so the CLI and the Python API take the same options


def _field_type(field: dataclasses.Field, hints: dict):
    t = hints[field.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        t = args[0]
    return t


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), help_texts: dict | None = None):
    """One `--flag` per dataclass field (underscores become dashes), typed and defaulted from the field."""
    hints = typing.get_type_hints(cls)
    help_texts = help_texts or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = _field_type(f, hints)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        doc = help_texts.get(f.name) or f.metadata.get("help", "")
        shown = doc if "(default:" in doc else f"{doc} (default: %(default)s)"  # a help text may say it in words
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif typing.get_origin(t) is typing.Literal:
            choices = typing.get_args(t)
            parser.add_argument(flag, choices=choices, default=default, help=shown)
        elif t in (int, float, str, Path):
            parser.add_argument(flag, type=t, default=default, help=shown)
        elif typing.get_origin(t) in (list, tuple):
            parser.add_argument(flag, nargs="+", default=default, help=shown)


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    """Build the dataclass from the parsed flags that belong to it."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# Subcommands

INT8_HELP = ("run the model in int8 on the CPU: every linear layer dynamically quantized, about 2-3x faster at "
             "batch 32 for a fraction of a point of accuracy (benchmarks/RESULTS.md)")
THREADS_HELP = ("CPU threads for torch (default: the cores that the last minute's load average leaves idle, 1 to 16, "
                "so that a busy machine slows a run down instead of stalling it)")


def cmd_info(args) -> None:
    import math

    from bertkit import model as models
    from bertkit.checkpoint import check_weights_fit, model_folder, read_state_dict, read_weight_shapes, weights_source
    from bertkit.config import BertConfig

    directory = model_folder(args.model_dir)
    config = BertConfig.load(directory)
    # shapes from the safetensors headers: a folder of any size is described without loading its weights
    shapes = read_weight_shapes(directory)
    if shapes is None:
        shapes = {k: tuple(v.shape) for k, v in read_state_dict(directory).items()}
    architectures = config.extra.get("architectures") or []
    cls = getattr(models, architectures[0], None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, models.BertPreTrainedModel)) or cls is models.BertPreTrainedModel:
        cls = models.BertModel  # an unknown architecture: the encoder's weights are checked, whatever the heads
    check_weights_fit(cls, config, shapes, weights_source(directory))
    params = sum(math.prod(v) for k, v in shapes.items() if not k.endswith(("position_ids", "token_type_ids")))
    heads = sorted({k.split(".")[0] for k in shapes if not k.startswith(("bert.", "embeddings.", "encoder.", "pooler."))})
    print(f"model folder     {directory}")
    print(f"architecture     {', '.join(config.extra.get('architectures', ['(not stated)']))}")
    print(f"layers L         {config.num_hidden_layers}")
    print(f"hidden H         {config.hidden_size}")
    print(f"heads A          {config.num_attention_heads}")
    print(f"feed-forward     {config.intermediate_size}")
    print(f"vocabulary       {config.vocab_size}")
    print(f"max positions    {config.max_position_embeddings}")
    print(f"parameters       {params:,} ({params / 1e6:.1f}M)")
    print(f"heads in weights {', '.join(heads) if heads else 'none (bare encoder)'}")
    if config.id2label:
        print(f"labels           {', '.join(config.id2label[i] for i in sorted(config.id2label))}")
    if (directory / "vocab.txt").exists() or (directory / "tokenizer.json").exists():
        from bertkit.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(directory)
        print(f"tokenizer        WordPiece, {tok.vocab_size} tokens, {'uncased' if tok.lowercase else 'cased'}")
    else:
        print("tokenizer        none in this folder")


def cmd_vocab_train(args) -> None:
    from bertkit.data.corpus import expand_inputs
    from bertkit.tokenizer import train_vocab

    files = expand_inputs(args.files)
    tok = train_vocab(
        files,
        args.out,
        vocab_size=args.vocab_size,
        lowercase=not args.cased,
        min_frequency=args.min_frequency,
        limit_alphabet=args.limit_alphabet,
    )
    print(f"wrote {args.out}/vocab.txt and tokenizer.json: {tok.vocab_size} tokens, {'cased' if args.cased else 'uncased'}")


def cmd_prepare(args) -> None:
    from bertkit.data.prepare import prepare
    from bertkit.tokenizer import Tokenizer

    prepare(
        args.inputs,
        Tokenizer.from_pretrained(args.tokenizer),
        args.out,
        shard_tokens=args.shard_tokens,
        heldout_fraction=args.heldout_fraction,
        batch_size=args.batch_size,
        fmt=args.format,
        text_field=args.text_field,
        seed=args.seed,
    )


def cmd_pretrain(args) -> None:
    from bertkit.train.pretrain import PretrainConfig, pretrain

    pretrain(dataclass_from_args(PretrainConfig, args))


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertkit",
        description="BERT end to end: train a WordPiece vocabulary, pretrain with masked LM + next-sentence "
        "prediction, fine-tune and score on GLUE and SQuAD. Model folders use the Hugging Face layout "
        "(config.json, model.safetensors, vocab.txt), so transformers loads them and bertkit loads theirs.",
        epilog="Run `bertkit COMMAND --help` for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also print informational messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="describe a model folder (size, heads, tokenizer)",
                       description="Print a model folder's configuration, parameter count, heads and tokenizer.")
    p.add_argument("model_dir", help="a folder in the Hugging Face layout (config.json + weights)")
    p.set_defaults(func=cmd_info)

    vocab = sub.add_parser("vocab", help="WordPiece vocabularies", description="WordPiece vocabulary tools.")
    vocab_sub = vocab.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)
    p = vocab_sub.add_parser(
        "train",
        help="train a WordPiece vocabulary on raw text",
        description="Train a WordPiece vocabulary on raw text files (plain or .gz; folders and globs are "
        "expanded) and write vocab.txt and tokenizer.json to --out. Uncased (lower-cased, accents stripped) "
        "unless --cased.",
    )
    p.add_argument("files", nargs="+", help="text files, folders or globs")
    p.add_argument("--out", required=True, help="folder to write vocab.txt and tokenizer.json to")
    p.add_argument("--vocab-size", type=int, default=30522, help="vocabulary size, special tokens included (default: %(default)s)")
    p.add_argument("--cased", action="store_true", help="keep case and accents")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged piece (default: %(default)s)")
    p.add_argument("--limit-alphabet", type=int, default=1000, help="most single characters kept (default: %(default)s)")
    p.set_defaults(func=cmd_vocab_train)

    p = sub.add_parser(
        "prepare",
        help="tokenize a raw-text corpus once into shards for pretraining",
        description="Tokenize raw text (one sentence per line with blank lines between documents, one document "
        "per line, or JSON lines; plain or .gz; folders and globs are expanded) into memory-mapped token shards "
        "with a held-out split, in --out. Re-running adds only files not yet prepared. Prints the token count "
        "and throughput (tokens/s).",
    )
    p.add_argument("inputs", nargs="+", help="text files, folders or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (vocab.txt / tokenizer.json)")
    p.add_argument("--out", required=True, help="folder to write the prepared corpus to")
    p.add_argument("--heldout-fraction", type=float, default=0.01,
                   help="share of documents held out for evaluation, chosen by a hash of their text (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="salt of the held-out hash (default: %(default)s)")
    p.add_argument("--format", choices=("auto", "bert", "docs", "jsonl"), default="auto",
                   help="input layout; auto guesses per file (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="the text field of JSON lines input (default: %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=2**25, help="tokens per shard, about (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="sentences tokenized per batch (default: %(default)s)")
    p.set_defaults(func=cmd_prepare)

    from bertkit.train.pretrain import PretrainConfig

    p = sub.add_parser(
        "pretrain",
        help="pretrain BERT (masked LM + next sentence) from raw text or a prepared corpus",
        description="Pretrain BertForPreTraining and write a run folder: pretrain_config.json, train.csv / "
        "eval.csv, TensorBoard events, loss_curve.png, and checkpoints/step-N (transformers-loadable model "
        "folders with the training state). With no arguments it runs a short offline demo: the tiny model, a "
        "vocabulary trained on the fly and the corpus prepared into the run folder. Under `torchrun "
        "--nproc-per-node N -m bertkit.cli pretrain ...` the same command trains with DistributedDataParallel.",
    )
    add_dataclass_args(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    from bertkit.tasks.finetune import FinetuneConfig
    from bertkit.tasks.glue import GlueConfig

    p = sub.add_parser(
        "finetune",
        help="fine-tune on a GLUE task, SQuAD v1.1/v2.0 or your own labelled files",
        description="Fine-tune a pretrained model folder: AdamW with linear warm-up and decay, length-grouped "
        "batches, the official metrics on the dev data after every epoch, and the best epoch's model kept in "
        "--out-dir in the Hugging Face layout, with finetune_config.json, metrics.json and results.md. "
        "Examples: `--task SST-2 --data-dir glue/SST-2`; `--task squad1 --train-file dev-v1.1.json "
        "--train-articles 38`; `--task custom --train-file train.csv --eval-file dev.csv --text-a review "
        "--label stars`.",
    )
    add_dataclass_args(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "evaluate",
        help="score a fine-tuned model folder on its task's dev data",
        description="Re-score a fine-tuned model. The task, data and lengths default to those in the folder's "
        "finetune_config.json; the options below replace them.",
    )
    p.add_argument("model_dir", help="a fine-tuned model folder (what `bertkit finetune` wrote)")
    p.add_argument("--task", help="GLUE task, squad1, squad2 or custom (default: the run's)")
    p.add_argument("--data-dir", help="the task's data folder (default: the run's)")
    p.add_argument("--eval-file", help="a labelled file to score on instead")
    p.add_argument("--max-length", type=int, help="tokens per example or window (default: the run's)")
    p.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default: the run's)")
    p.add_argument("--null-threshold", type=float,
                   help="SQuAD v2.0: answer '' when null score - best span score exceeds this (default: the run's); "
                   "the official script's --na-prob-thresh is exp of it, as null_odds.json holds exp of the difference")
    p.add_argument("--out", help="folder for eval_metrics.json (and SQuAD's predictions.json; v2.0 also "
                   "null_odds.json and predictions_spans.json, the official script's input)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: the run's, auto)")
    p.add_argument("--int8", action="store_true", help=INT8_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="label texts or answer questions with a fine-tuned model",
        description="A classifier reads one text per line, or a pair as text<TAB>pair, and prints one JSON line "
        "per input line, in order: the label and its probability (a score for regression); a blank line gets "
        '{"text": "", "label": null, "probability": null, "error": "blank line: no text to label"} (regression: '
        '"score": null). Input must be UTF-8 (a line that is not, a line of more than two tab-separated fields, '
        "or a mix of single texts and pairs stops with an error naming the line, exit status 2); control "
        "characters are dropped by the tokenizer, as BERT does. A question-answering model reads JSON "
        'lines {"question": ..., "context": ...} and prints the answer. Reads standard input when INPUT is - '
        "or left out.",
    )
    p.add_argument("model_dir", help="a fine-tuned model folder")
    p.add_argument("input", nargs="?", default="-", help="input file (default: standard input)")
    p.add_argument("--out", help="write the JSON lines here instead of standard output")
    p.add_argument("--max-length", type=int, help="tokens per example or window (default: the run's)")
    p.add_argument("--eval-batch-size", type=int, help="batch size (default: the run's)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: the run's, auto)")
    p.add_argument("--int8", action="store_true", help=INT8_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "glue",
        help="fine-tune one model on several GLUE tasks with the paper's lr grid and print its GLUE table",
        description="For each task, fine-tune with every --lrs value, keep the lr that scores best on dev, and "
        "print (and write to glue_results.md) the paper's Table 1: the task columns with their metrics, and the "
        "average.",
    )
    add_dataclass_args(p, GlueConfig)
    p.set_defaults(func=cmd_glue)

    from bertkit.tasks.suite import SuiteConfig

    p = sub.add_parser(
        "suite",
        help="fine-tune one model on every shared GLUE task and SQuAD over seeds and an lr grid; one table",
        description="The downstream suite: fine-tune --model-dir on CoLA, SST-2, MRPC, STS-B, QNLI, RTE, WNLI and "
        "a SQuAD v1.1 article split of the shared data, every (task, lr, seed) cell, and print the paper-style "
        "table (mean ± std over seeds at each task's best lr, the GLUE average, the time). Cells are kept in "
        "OUT_DIR/suite.json: a rerun or another row (another model, --from-scratch) adds only what is missing, "
        "and the table shows every row.",
    )
    add_dataclass_args(p, SuiteConfig)
    p.set_defaults(func=cmd_suite)

    from bertkit.export import ExportConfig

    p = sub.add_parser(
        "export",
        help="write a model folder as ONNX (float32 and int8), checked against bertkit with ONNX Runtime",
        description="Export a fine-tuned classifier, regressor or QA model (or a bare encoder) to --out: "
        "model.onnx (inputs input_ids, token_type_ids, attention_mask; batch and length dynamic), model.int8.onnx "
        "(ONNX Runtime's dynamic int8 quantization), the tokenizer files and config.json beside them, and "
        "export.json with how closely ONNX Runtime's outputs matched bertkit's on check batches (an error if the "
        "float32 graph is outside --tolerance). Needs the onnx extra: pip install 'bertkit[onnx]'.",
    )
    p.add_argument("model_dir", help="the model folder to export")
    add_dataclass_args(p, ExportConfig, skip=("model_dir",))
    p.set_defaults(func=cmd_export)

    from bertkit.serve import ServeConfig

    p = sub.add_parser(
        "serve",
        help="serve a fine-tuned model over HTTP (JSON), with dynamic batching",
        description="Serve a fine-tuned classifier, regressor or QA model: POST /predict with "
        '{"inputs": "a text"} or {"inputs": ["a text", {"text": "a", "pair": "b"}, ...]} (QA: '
        '{"question": ..., "context": ...}) answers {"predictions": [...]}, as `bertkit predict` prints them; GET '
        "/health and GET /metadata. Requests wait at most --max-wait-ms to share a forward pass of up to "
        "--max-batch-size inputs; a full queue answers 503, oversize requests 413, malformed ones 400/422. SIGTERM "
        "or Ctrl-C finishes the requests in flight, then exits. Needs the serve extra: pip install 'bertkit[serve]' (starlette, uvicorn).",
    )
    p.add_argument("model_dir", help="a fine-tuned model folder")
    add_dataclass_args(p, ServeConfig, skip=("model_dir",))
    p.set_defaults(func=cmd_serve)

    return parser


def cmd_suite(args) -> None:
    from bertkit.tasks.suite import SuiteConfig, suite

    result = suite(dataclass_from_args(SuiteConfig, args))
    print(result["table"], end="")


def cmd_finetune(args) -> None:
    from bertkit.tasks.finetune import FinetuneConfig, finetune

    finetune(dataclass_from_args(FinetuneConfig, args))


def cmd_evaluate(args) -> None:
    from bertkit.tasks.finetune import evaluate

    metrics = evaluate(args.model_dir, task=args.task, out_dir=args.out, data_dir=args.data_dir,
                       eval_file=args.eval_file, max_length=args.max_length, eval_batch_size=args.eval_batch_size,
                       null_threshold=args.null_threshold, threads=args.threads, device=args.device, int8=args.int8)
    width = max(map(len, metrics))
    for name, value in metrics.items():
        # SQuAD v2.0's thresholds are null odds, as small as 1e-5: in significant digits, not 4 decimals
        print(f"{name:<{width}}  {value:.6g}" if name.endswith("_thresh") else f"{name:<{width}}  {value:.4f}")


def cmd_predict(args) -> None:
    import json

    from bertkit.tasks.finetune import predict

    # bytes, so that a line that is not UTF-8 is named rather than failing the whole stream
    inputs = getattr(sys.stdin, "buffer", sys.stdin) if args.input == "-" else args.input
    results = predict(args.model_dir, inputs, max_length=args.max_length, eval_batch_size=args.eval_batch_size,
                      threads=args.threads, device=args.device, int8=args.int8)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.out:
        try:
            Path(args.out).write_text(lines, encoding="utf-8")
        except OSError as e:
            raise BertkitError(f"{args.out}: cannot write ({e.strerror or e}); expected a file path for --out") from None
    else:
        sys.stdout.write(lines)


def cmd_export(args) -> None:
    from bertkit.export import ExportConfig, export

    report = export(dataclass_from_args(ExportConfig, args))
    out = Path(args.out)
    for kind, name in report["files"].items():
        check = report["check"][kind]
        print(f"wrote {out / name} ({kind}): largest difference from bertkit {check['max_abs_diff']:.2g} "
              f"(tolerance {check['tolerance']})")
    print(f"wrote {out / 'export.json'}, config.json and the tokenizer files")


def cmd_serve(args) -> None:
    import torch

    from bertkit.serve import ServeConfig, address, create_app, listen, run

    config = dataclass_from_args(ServeConfig, args)
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    sock = listen(config.host, config.port)
    try:
        app = create_app(config)
        predictor = app.state.predictor
        # the tests and the load benchmark read the address from this line
        print(f"bertkit: serving {predictor.directory} ({predictor.kind}{', int8' if config.int8 else ''}) on "
              f"{address(sock)} : POST /predict, GET /health, GET /metadata", flush=True)
        run(app, sock, config)
    finally:
        sock.close()


def cmd_glue(args) -> None:
    from bertkit.tasks.glue import GlueConfig, glue

    glue(**dataclasses.asdict(dataclass_from_args(GlueConfig, args)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="bertkit: %(message)s")
    try:
        args.func(args)
    except BertkitError as e:
        print(f"bertkit: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training loop says where it saved its checkpoint
        print("bertkit: interrupted" + (f": {one_line(str(e))}" if str(e) else ""), file=sys.stderr)
        return 130
    return 0


def one_line(message: str) -> str:
    """A message that echoes a user's value (a path, a flag) keeps its line breaks visible but on one line."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


if __name__ == "__main__":
    sys.exit(main())
