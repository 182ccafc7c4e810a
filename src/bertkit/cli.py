"""`bertkit` and its subcommands. Thin: parse arguments, call one library function, print the result.

Bad input raises `BertkitError`; the CLI prints it in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
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
    """One argument per dataclass field: `--flag` (underscores become dashes; `option(flag=...)` names it
    otherwise), or a positional one (`option(positional=True)`), typed, defaulted and documented from the field."""
    hints = typing.get_type_hints(cls)
    help_texts = help_texts or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = _field_type(f, hints)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = help_texts.get(f.name) or f.metadata.get("help", "")
        many = typing.get_origin(t) in (list, tuple)
        if f.metadata.get("positional"):
            nargs = "+" if many else ("?" if default is not None and default != "" else None)
            parser.add_argument(f.name, nargs=nargs, default=default if nargs == "?" else None, help=doc)
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        flags = (flag, *f.metadata.get("aliases", ()))
        names = {"dest": f.name} if flag.lstrip("-").replace("-", "_") != f.name or len(flags) > 1 else {}
        if f.metadata.get("required"):
            names["required"] = True
        # an unset default is the help text's to explain ("unset: ..."): "(default: None)" would say nothing
        unset = default is None or default == ""
        shown = doc if "(default:" in doc or names.get("required") or unset else f"{doc} (default: %(default)s)"
        if t is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=doc, **names)
        elif typing.get_origin(t) is typing.Literal:
            parser.add_argument(*flags, choices=typing.get_args(t), default=default, help=shown, **names)
        elif t in (int, float, str, Path):
            parser.add_argument(*flags, type=t, default=default, help=shown, **names)
        elif many:
            parser.add_argument(*flags, nargs="+", default=default, help=shown, **names)


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    """Build the dataclass from the parsed flags that belong to it."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# Subcommands

def cmd_info(args) -> None:
    from bertkit.adapter import describe_adapter, is_adapter
    from bertkit.checkpoint import describe_model

    describe = describe_adapter if is_adapter(args.model_dir) else describe_model
    for name, value in describe(args.model_dir).items():
        print(f"{name:<16} {value}")


def cmd_vocab_train(args) -> None:
    from bertkit.tokenizer import VocabConfig, vocab_train

    config = dataclass_from_args(VocabConfig, args)
    # tokenizers' trainer draws its bars on standard error but ends each with a newline on standard output, whatever
    # it is: into a file or a pipe, six blank lines before the result; with standard error not a terminal the bars
    # are not drawn anyway
    tok = vocab_train(config, show_progress=sys.stderr.isatty())
    print(f"wrote {config.out}/vocab.txt and tokenizer.json: {tok.vocab_size} tokens, "
          f"{'cased' if config.cased else 'uncased'}")


def cmd_vocab_extend(args) -> None:
    from bertkit.extend import VocabExtendConfig, vocab_extend

    done = vocab_extend(dataclass_from_args(VocabExtendConfig, args))
    shown = ", ".join(f"{token} ({count:,})" for token, count in done["tokens"][:12])
    print(f"wrote {done['out']} ({done['architecture']}): {done['added']:,} tokens added to the {done['from']:,}, "
          f"the most used first: {shown}{', ...' if done['added'] > 12 else ''}")


def cmd_prepare(args) -> None:
    from bertkit.data.prepare import PrepareConfig, prepare_corpus

    print(prepare_corpus(dataclass_from_args(PrepareConfig, args)))


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
                       description="Print a model folder's configuration, parameter count, heads and tokenizer; of a "
                       "peft LoRA adapter folder, its base, rank and adapted layers.")
    p.add_argument("model_dir", help="a folder in the Hugging Face layout (config.json + weights), Google's "
                   "(bert_config.json + bert_model.ckpt), or a peft LoRA adapter folder (adapter_config.json)")
    p.set_defaults(func=cmd_info)

    vocab = sub.add_parser("vocab", help="WordPiece vocabularies", description="WordPiece vocabulary tools.")
    vocab_sub = vocab.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)
    p = vocab_sub.add_parser(
        "train",
        help="train a WordPiece vocabulary on raw text",
        description="Train a WordPiece vocabulary on raw text, read as `prepare` reads it (one sentence per line "
        "with blank lines between documents, one document per line, or JSON lines; plain or .gz; folders and globs "
        "are expanded), and write vocab.txt and tokenizer.json to --out. Uncased (lower-cased, accents stripped) "
        "unless --cased.",
    )
    from bertkit.tokenizer import VocabConfig

    add_dataclass_args(p, VocabConfig)
    p.set_defaults(func=cmd_vocab_train)

    p = vocab_sub.add_parser(
        "extend",
        help="add a domain's words to a model's vocabulary, their embeddings from the pieces they were",
        description="Train a WordPiece vocabulary on the domain's text (FILES, read as `prepare` reads them), take "
        "the --add tokens it uses most that the model's vocabulary lacks, append them (the old tokens keep their "
        "ids) and write the model to --out with an embedding row for each: the mean of the rows of the pieces the "
        "old tokenizer split it into (the masked-LM output bias likewise). Text the new tokens do not match is "
        "encoded and run exactly as before; continue pretraining on the domain (`bertkit pretrain --model-dir "
        "OUT`) for the model to learn them. transformers loads the folder as any BERT.",
    )
    from bertkit.extend import VocabExtendConfig

    add_dataclass_args(p, VocabExtendConfig)
    p.set_defaults(func=cmd_vocab_extend)

    p = sub.add_parser(
        "prepare",
        help="tokenize a raw-text corpus once into shards for pretraining",
        description="Tokenize raw text (one sentence per line with blank lines between documents, one document "
        "per line, or JSON lines; plain or .gz; folders and globs are expanded) into memory-mapped token shards "
        "with a held-out split, in --out. Re-running adds only files not yet prepared. Prints the token count "
        "and throughput (tokens/s).",
    )
    from bertkit.data.prepare import PrepareConfig

    add_dataclass_args(p, PrepareConfig)
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
        help="fine-tune on a GLUE task, SQuAD v1.1/v2.0, SWAG, tagged words (NER) or your own labelled files",
        description="Fine-tune a pretrained model folder: AdamW with linear warm-up and decay, length-grouped "
        "batches, the official metrics on the dev data after every epoch, and the best epoch's model kept in "
        "--out-dir in the Hugging Face layout, with finetune_config.json, metrics.json and results.md. "
        "Examples: `--task SST-2 --data-dir glue/SST-2`; `--task squad1 --train-file dev-v1.1.json "
        "--train-articles 38`; `--task ner --data-dir conll2003` (CoNLL files: train.txt, dev.txt); `--task swag "
        "--data-dir swag` (train.csv, val.csv); `--task custom "
        "--train-file train.csv --eval-file dev.csv --text-a review --label stars`.",
    )
    add_dataclass_args(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "evaluate",
        help="score a fine-tuned model folder on its task's dev data",
        description="Re-score a fine-tuned model. The task, data and lengths default to those in the folder's "
        "finetune_config.json; the options below replace them.",
    )
    from bertkit.tasks.evaluation import EvaluateConfig, PredictConfig

    add_dataclass_args(p, EvaluateConfig)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="label texts, tag their words, answer questions or choose endings with a fine-tuned model; fill in "
        "[MASK] with a pretrained one",
        description="A classifier reads one text per line, or a pair as text<TAB>pair, and prints one JSON line "
        "per input line, in order: the label and its probability (a score for regression; a multi-label model's "
        '"labels", those at or above --label-threshold, and "probabilities", every label\'s); a blank line gets '
        '{"text": "", "label": null, "probability": null, "error": "blank line: no text to label"} (regression: '
        '"score": null). Input must be UTF-8 (a line that is not, a line of more than two tab-separated fields, '
        "or a mix of single texts and pairs stops with an error naming the line, exit status 2); control "
        "characters are dropped by the tokenizer, as BERT does. A classifier's .csv or .jsonl INPUT is read as finetune's "
        "custom files are, by column names (--text-a, --text-b: the run's by default), and each result also "
        'gives its row\'s "line". A question-answering model reads JSON '
        'lines {"question": ..., "context": ...} and prints the answer. A tagger (finetune --task ner) reads one '
        'text per line, splits it into words as BERT does, and prints {"text", "words", "tags", "entities"}, '
        "each entity with its type, text and character offsets into the line. A multiple-choice model (finetune "
        '--task swag) reads JSON lines {"context": ..., "endings": [...], "lead"?: ...} and prints the chosen '
        "ending, its number and every ending's probability. A pretraining (or masked-LM) folder fills in [MASK]: "
        'each line a text (or pair) with [MASK] where a token is to be predicted, each result its "masks" (per mask, '
        'the --top-k tokens with their probabilities) and the text "filled" with the first of each, as transformers\' '
        "fill-mask pipeline predicts them. Reads standard input when INPUT is - or left out.",
    )
    add_dataclass_args(p, PredictConfig)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "explain",
        help="which words a classifier's prediction rests on: each word's share of it (integrated gradients), as "
        "JSON lines and an HTML page",
        description="Read inputs as `bertkit predict` reads a classifier's (text or text<TAB>pair lines, or a .csv or "
        ".jsonl file by columns) and print one JSON line per input: the prediction, the label explained (--label, "
        "else the predicted one), its probability at the input (output) and at the baseline (baseline_output), and "
        'the share of it of every word ("words": word, segment, start, end, attribution; character offsets into '
        'the text or, segment 1, the pair) and token ("tokens"). By integrated gradients the shares add up to '
        "output - baseline_output, up to the quadrature's error (delta). --html draws the results on one page, "
        "each word shaded by its share. A regressor's score is explained the same way.",
    )
    from bertkit.tasks.explain import ExplainConfig

    add_dataclass_args(p, ExplainConfig)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "glue",
        help="fine-tune one model on several GLUE tasks with the paper's lr grid and print its GLUE table",
        description="For each task, fine-tune with every --lrs value, keep the lr that scores best on dev, and "
        "print (and write to glue_results.md) the paper's Table 1: the task columns with their metrics, and the "
        "average.",
    )
    add_dataclass_args(p, GlueConfig)
    p.set_defaults(func=cmd_glue)

    p = sub.add_parser(
        "crossval",
        help="k-fold cross-validation of fine-tuning on a labelled file: the score's mean and spread, every row's "
        "out-of-fold prediction, the labels to check first",
        description="Cut the training file (a GLUE task's or --task custom's --train-file) into --folds folds "
        "stratified by label; fine-tune once per fold (OUT_DIR/fold-K, the finetune options below) on the other "
        "folds and score it on that one, keeping the last epoch (--keep last: no choice made on the fold it is "
        "scored on). Prints and writes OUT_DIR/crossval.md: each fold's scores, their mean ± std and the scores of "
        "the out-of-fold predictions pooled over the whole file, then the rows whose gold label the model that did "
        "not train on them finds least likely (where label errors are to be looked for); out_of_fold.jsonl has "
        "every row's prediction and loss, crossval.json the numbers. Interrupted, the same command again resumes: "
        "finished folds are kept, an interrupted one continues.",
    )
    # not the fold's own options, nor those of tasks without labels to stratify by (SQuAD, tagging, embeddings)
    not_here = ("fold", "eval_split", "predict", "resume", "test_file", "train_articles", "doc_stride",
                "max_query_length", "whole_articles", "null_threshold", "text_neg", "embedding_scale",
                "label_all_tokens")
    add_dataclass_args(p, FinetuneConfig, skip=not_here,
                       help_texts={"folds": "folds to cut the training file into (default: 5)",
                                   "out_dir": "folder of the fold runs and the results (default: runs/crossval)",
                                   "keep": "each fold's kept epoch: last (its score an honest estimate) or best "
                                           "(chosen on the fold it is scored on: optimistic)",
                                   "overwrite": "run every fold again (without it, a rerun keeps finished folds "
                                                "and continues an interrupted one)"})
    p.set_defaults(func=cmd_crossval, folds=5, keep="last", out_dir="runs/crossval")

    from bertkit.tasks.soup import SoupConfig

    p = sub.add_parser(
        "soup",
        help="average the weights of runs fine-tuned from one model on one task (a model soup), or of a "
        "pretraining run's last checkpoints, into one model",
        description="Average RUNS, fine-tuned from the same pretrained model on the same task and data (an lr or "
        "seed search), into one model folder at --out (Wortsman et al. 2022's model soups). The greedy soup (the "
        "default) adds the runs best first by their score on the runs' (first) eval data, keeping each that does "
        "not lower it; the uniform soup averages every run. Every run, both soups and the runs' ensemble (their "
        "logits averaged) are scored on every eval split: printed and written to OUT/soup.md, the numbers to "
        "soup.json. Choose on rows held out of the training file (finetune --eval-split, the same for every run) "
        "and the dev data reports the soup without the choice seeing it. With --data, RUNS are checkpoints of one "
        "pretraining run (RUN/checkpoints/step-N), averaged and scored by held-out masked-LM loss on a prepared "
        "corpus (latest weight averaging: the last few checkpoints, --recipe uniform).",
    )
    add_dataclass_args(p, SoupConfig)
    p.set_defaults(func=cmd_soup)

    from bertkit.tasks.prune import PruneConfig

    p = sub.add_parser(
        "prune",
        help="make a fine-tuned model smaller and faster: remove its least important encoder blocks and "
        "feed-forward units",
        description="Measure how much each encoder block and each feed-forward unit of RUN (a run `bertkit "
        "finetune` wrote: a classifier or regressor, a tagger, a SQuAD or SWAG model) matters to its loss on "
        "--batches batches of its training rows (the first-order change of the loss with the unit gated off), keep "
        "the --layers most important blocks (or the bottom ones: --drop-layers top) and the --intermediate-size "
        "most important units of each, and write the smaller model to --out: a run folder of the standard shape "
        "that evaluate, predict, serve and transformers load. Its eval scores and the seconds per batch, before "
        "and after, are printed and written to OUT/prune.md (prune.json). Fine-tune the pruned folder again (`finetune --model-dir OUT`, optionally "
        "`--teacher RUN`) to recover what it lost.",
    )
    add_dataclass_args(p, PruneConfig)
    p.set_defaults(func=cmd_prune)

    from bertkit.tasks.probe import DATA_HELP, DATA_OPTIONS, ProbeConfig

    p = sub.add_parser(
        "probe",
        help="what each layer of a model holds about a task: a linear probe per layer on the frozen encoder, "
        "against a random-weights control",
        description="Run every training and eval example of a task (a GLUE task's, --task custom's or --task "
        "ner's files, the data options of `finetune`) through each of MODELS, frozen, and pool every layer's output "
        "(0: the embeddings; a tagging task's words: each at its first piece); a linear probe per layer (logistic "
        "regression, ridge for scores; standardized features, the L2 strength chosen by the loss on a tenth of the "
        "training rows) learns the labels from those vectors alone and is scored on the eval data with the task's "
        "metrics. The first model's architecture with random weights is probed too (--control) and the majority "
        "class scored: what a layer holds beyond them is what pretraining put there. Prints and writes OUT/probe.md "
        "(a column per model, a row per layer), probe.json and probe.png; a rerun with the same settings keeps the "
        "models already probed and adds new ones.",
    )
    add_dataclass_args(p, ProbeConfig)
    add_dataclass_args(p, FinetuneConfig, skip=tuple(f.name for f in dataclasses.fields(FinetuneConfig)
                                                     if f.name not in DATA_OPTIONS), help_texts=DATA_HELP)
    p.set_defaults(func=cmd_probe)

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

    from bertkit.tasks.ablate import GRIDS, AblateConfig

    p = sub.add_parser(
        "ablate",
        help="the paper's ablations: pretrain named variants at equal compute, score each with the suite; one table",
        description="Pretrain every variant of --grid (" + "; ".join(f"{g}: {', '.join(v)}" for g, v in GRIDS.items())
        + ") for --seeds seeds at the same budget on the shared books corpus, fine-tune each pretrained model "
        "through the downstream suite, and print the table (mean ± std over pretraining seeds) and write "
        "OUT_DIR/ablate.md and ablate.png. Every finished cell is kept in OUT_DIR/ablate.json and every step "
        "inside a cell resumes, so a rerun, more seeds or more --variants add only what is missing.",
    )
    add_dataclass_args(p, AblateConfig)
    p.set_defaults(func=cmd_ablate)

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

    from bertkit.tasks.perplexity import PerplexityConfig

    p = sub.add_parser(
        "perplexity",
        help="held-out masked-LM loss and perplexity of a model folder at a length, and of the same text in pieces",
        description="Score MODEL_DIR's masked-LM head on the held-out split of a prepared corpus at --max-length "
        "(the paper's masking, 15%, drawn from --seed, so models scored at the same --max-length and --seed are "
        "scored on the same tokens; another length or seed takes other examples), and with --pieces P on the same "
        "examples cut into P-token pieces with the same masked tokens: what the longer context buys a model "
        "extended with `bertkit extend`.",
    )
    add_dataclass_args(p, PerplexityConfig)
    p.set_defaults(func=cmd_perplexity)

    from bertkit.tasks.embed import EmbedConfig

    p = sub.add_parser(
        "embed",
        help="vectors of texts from a model's layers: sentence embeddings, or the paper's feature-based features",
        description="Read one text per line (or text<TAB>pair) and write its vector: the mean over its tokens of "
        "the last layer (--pool mean, sentence-transformers' reading of all-MiniLM-L6-v2; with --normalize its "
        "embeddings), [CLS]'s (--pool cls), or a vector per token (--pool tokens, Google's extract_features.py); "
        "from any --layers, concatenated or summed (the paper's feature-based approach, Table 7: --layers -1 -2 -3 "
        "-4). A .npy --out holds an N x D float32 array, row i for line i; otherwise JSON lines, one per input "
        'line: {"line", "text", "embedding"} or {"line", "text", "tokens", "vectors"}. A blank line, a line that '
        "is not UTF-8, or a mix of single texts and pairs stops with an error naming the line (exit status 2).",
    )
    add_dataclass_args(p, EmbedConfig)
    p.set_defaults(func=cmd_embed)

    from bertkit.data.longdoc import LongDocConfig

    p = sub.add_parser(
        "longdoc",
        help="build a long-document classification task from the books corpus: which book a passage comes from",
        description="Write OUT/train.jsonl and dev.jsonl: passages of --words words (about 4,000 tokens at 3,000) "
        "from --books books of different authors, chapters dealt to train and dev (every --dev-every-th to dev, so "
        "no text is shared), balanced, labelled with the book's title; and OUT/books.json, what was chosen. Then: "
        "bertkit finetune --task custom --train-file OUT/train.jsonl --eval-file OUT/dev.jsonl --max-length 4096 "
        "--model-dir an extended model (or --max-length 512: the first 512 tokens).",
    )
    add_dataclass_args(p, LongDocConfig)
    p.set_defaults(func=cmd_longdoc)

    from bertkit.extend import ExtendConfig

    p = sub.add_parser(
        "extend",
        help="give a model folder more positions (inputs longer than 512) and windowed attention",
        description="Write a copy of MODEL_DIR with --max-length learned positions, filled from the trained ones "
        "(--method copy: position p takes trained position p mod 512, so inputs of up to 512 tokens keep their "
        "outputs with --attention-window 0, and with a window those of up to half the window + 1 tokens, 257 at "
        "the default 512; interpolate: the trained table stretched), and with --attention-window: each token "
        "attends to "
        "half the window on each side plus the global tokens ([CLS]; for QA the question), so time and memory "
        "grow linearly with the length. config.json records what was done; transformers still loads the folder "
        "(as an ordinary BERT, with full attention). Continue pretraining it at the new length with "
        "`bertkit pretrain --model-dir OUT --max-length 4096 --objective mlm`.",
    )
    add_dataclass_args(p, ExtendConfig)
    p.set_defaults(func=cmd_extend)

    from bertkit.data.download import DownloadConfig

    p = sub.add_parser(
        "download",
        help="fetch GLUE, SQuAD, SWAG, tagged words or a pretraining corpus into what --data-dir, --train-file and "
        "--corpus read (needs a network)",
        description="Fetch the fine-tuning data: `bertkit download squad --out data/squad` (train and dev of "
        "SQuAD v1.1 and v2.0 from its official site), `bertkit download swag --out data/swag` (SWAG's train.csv, "
        "val.csv and test.csv from its authors' repository) or `bertkit download glue --out data/glue [--tasks SST-2 "
        "MRPC]` (from the Hugging Face Hub's nyu-mll/glue through the datasets package, written as GLUE's own "
        "task folders: SST-2/train.tsv, MNLI/dev_matched.tsv, diagnostic/diagnostic.tsv); or text to pretrain on: "
        "`bertkit download corpus --dataset wikimedia/wikipedia --dataset-config 20231101.en --out data/wiki "
        "--max-documents 100000` (any Hub dataset with a text column, streamed, written as JSON lines files that "
        "prepare and pretrain --corpus read); or words and their tags: `bertkit download ner --dataset DATASET "
        "--out data/ner` (a Hub dataset with a column of words and one of tags, tokens and ner_tags by default, "
        "written as CoNLL files, train.txt, dev.txt and test.txt, that finetune --task ner --data-dir reads). Files "
        "already there are kept, so a fetch cut short is finished by running it again.",
    )
    add_dataclass_args(p, DownloadConfig)
    p.set_defaults(func=cmd_download)

    from bertkit.tf_checkpoint import ConvertConfig

    p = sub.add_parser(
        "convert",
        help="write a model in Google's original TensorFlow layout, NVIDIA's or Composer's (MosaicML), or any of "
        "them in transformers'",
        description="Convert between transformers' layout (config.json, model.safetensors, tokenizer files), "
        "Google's original BERT layout (bert_config.json, vocab.txt, bert_model.ckpt.index and "
        ".data-00000-of-00001, TensorFlow 1 variable names; written without TensorFlow), NVIDIA's BERT recipe's "
        "(bert_config.json, vocab.txt, bert_model.pt) and Composer's, which MosaicML's BERT recipes save (one .pt "
        "file holding weights, config and tokenizer). --to google writes what Google's run_classifier.py, "
        "run_squad.py and run_pretraining.py take as --init_checkpoint; --to nvidia what NVIDIA's run_squad.py and "
        "run_glue.py load as --init_checkpoint; --to composer what Composer's Trainer loads with load_path and "
        "load_weights_only (the hf_bert model); --to hf what transformers loads. Every command also reads a Google "
        "or NVIDIA folder as it is; a Composer checkpoint file is converted first: "
        "`bertkit convert ep1-ba1000-rank0.pt --out my-model --to hf`.",
    )
    add_dataclass_args(p, ConvertConfig)
    p.set_defaults(func=cmd_convert)

    from bertkit.serve import ServeConfig

    p = sub.add_parser(
        "serve",
        help="serve a fine-tuned model (a pretrained one's [MASK] filling, an encoder's vectors) over HTTP (JSON), "
        "with dynamic batching",
        description="Serve a fine-tuned classifier, regressor, tagger, QA or multiple-choice model: POST /predict "
        'with {"inputs": "a text"} or {"inputs": ["a text", {"text": "a", "pair": "b"}, ...]} (QA: '
        '{"question": ..., "context": ...}; a tagger: no pairs; multiple choice: {"context": ..., "endings": '
        '[...]}) answers {"predictions": [...]}, as `bertkit predict` prints them; GET /health and GET /metadata. '
        "A pretraining (or masked-LM) checkpoint fills in [MASK] in texts that have one, as `bertkit predict` does. "
        'An encoder without a head (all-MiniLM-L6-v2), or any model with --embed, answers {"embedding": [...]} per '
        "input, as `bertkit embed` computes it. "
        "Requests wait at most --max-wait-ms to share a forward pass of up to --max-batch-size inputs; a full "
        "queue answers 503, oversize requests 413, malformed ones 400/422. SIGTERM or Ctrl-C finishes the requests "
        "in flight, then exits. Needs the serve extra: pip install 'bertkit[serve]' (starlette, uvicorn).",
    )
    p.add_argument("model_dir", help="a fine-tuned model folder, a pretraining one (to fill in [MASK]), or an "
                   "encoder's for its vectors")
    add_dataclass_args(p, ServeConfig, skip=("model_dir",))
    p.set_defaults(func=cmd_serve)

    return parser


def cmd_suite(args) -> None:
    from bertkit.tasks.suite import SuiteConfig, suite

    result = suite(dataclass_from_args(SuiteConfig, args))
    print(result["table"], end="")


def cmd_ablate(args) -> None:
    from bertkit.tasks.ablate import AblateConfig, ablate

    print(ablate(dataclass_from_args(AblateConfig, args))["table"], end="")


def cmd_finetune(args) -> None:
    from bertkit.tasks.finetune import FinetuneConfig, finetune

    finetune(dataclass_from_args(FinetuneConfig, args))


def cmd_evaluate(args) -> None:
    from bertkit.tasks.evaluation import EvaluateConfig, evaluate

    metrics = evaluate(**dataclasses.asdict(dataclass_from_args(EvaluateConfig, args)))
    width = max(map(len, metrics))
    for name, value in metrics.items():
        # SQuAD v2.0's thresholds are null odds, as small as 1e-5: in significant digits, not 4 decimals
        print(f"{name:<{width}}  {value:.6g}" if name.endswith("_thresh") else f"{name:<{width}}  {value:.4f}")


def cmd_predict(args) -> None:
    from bertkit.tasks.evaluation import PredictConfig, predict_stream

    options = dataclasses.asdict(dataclass_from_args(PredictConfig, args))
    source, out = options.pop("input"), options.pop("out")
    # every line checked and the model loaded here; the results are written as they are made, chunk by chunk
    write_json_lines(predict_stream(inputs=input_stream(source), **options), out)


def cmd_explain(args) -> None:
    from bertkit.tasks.explain import ExplainConfig, explain_stream, write_html

    options = dataclasses.asdict(dataclass_from_args(ExplainConfig, args))
    source, out, page = options.pop("input"), options.pop("out"), options.pop("html")
    results = explain_stream(inputs=input_stream(source), **options)
    if page:  # the page needs every result: they are kept as they are written
        kept: list[dict] = []
        results = (kept.append(r) or r for r in results)
    write_json_lines(results, out)
    if page:
        write_html(kept, page, options["model_dir"], options["method"])


def input_stream(source: str):
    """A command's INPUT: the path, or standard input's bytes for "-", so that a line that is not UTF-8 is named
    rather than failing the whole stream."""
    return getattr(sys.stdin, "buffer", sys.stdin) if source == "-" else source


def write_json_lines(results, out: str | None) -> None:
    """One JSON line per result, to standard output as they come, or to the file `out`, whole or not at all."""
    import json

    from bertkit.checkpoint import atomic_write

    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if not out:
        sys.stdout.writelines(lines)
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)

    try:
        atomic_write(Path(out), write)  # the file whole or not at all
    except OSError as e:
        raise BertkitError(f"{out}: cannot write ({e.strerror or e}); expected a file path for --out") from None


def cmd_export(args) -> None:
    from bertkit.export import ExportConfig, export

    report = export(dataclass_from_args(ExportConfig, args))
    out = Path(args.out)
    for kind, name in report["files"].items():
        check = report["check"][kind]
        print(f"wrote {out / name} ({kind}): largest difference from bertkit {check['max_abs_diff']:.2g} "
              f"(tolerance {check['tolerance']})")
    print(f"wrote {out / 'export.json'}, config.json and the tokenizer files")


def cmd_perplexity(args) -> None:
    from bertkit.tasks.perplexity import PerplexityConfig, perplexity

    for name, r in perplexity(dataclass_from_args(PerplexityConfig, args)).items():
        print(f"{name}: masked-LM loss {r['masked_lm_loss']:.4f}, perplexity {r['perplexity']:.2f}, accuracy "
              f"{100 * r['accuracy']:.2f}% over {r['masked_tokens']:,} masked tokens in {r['sequences']} sequences of "
              f"{r['tokens_per_sequence']:.0f} tokens on average")


def cmd_embed(args) -> None:
    from bertkit.tasks.embed import EmbedConfig, embed_stream, json_line, write

    config = dataclass_from_args(EmbedConfig, args)
    count, records = embed_stream(config)
    if config.out:
        write(records, Path(config.out), count)
    else:
        sys.stdout.writelines(json_line(r) for r in records)


def cmd_longdoc(args) -> None:
    from bertkit.data.longdoc import LongDocConfig, build_longdoc

    done = build_longdoc(dataclass_from_args(LongDocConfig, args))
    n = done["passages_per_book"]
    print(f"wrote {done['out']}/train.jsonl ({n['train']} passages a book) and dev.jsonl ({n['dev']} a book) of "
          f"{done['words_per_passage']} words from {len(done['books'])} books: "
          + "; ".join(f"{b['title']} ({b['author']})" for b in done["books"]))


def cmd_extend(args) -> None:
    from bertkit.extend import ExtendConfig, extend

    done = extend(dataclass_from_args(ExtendConfig, args))
    window = f"attention window {done['attention_window']}" if done["attention_window"] else "full attention"
    print(f"wrote {done['out']}: {done['architecture']}, {done['from']} -> {done['to']} positions by "
          f"{done['method']}, {window}")


def cmd_download(args) -> None:
    from bertkit.data.download import DownloadConfig, download

    config = dataclass_from_args(DownloadConfig, args)
    written = download(config)
    names = [p.relative_to(config.out).as_posix() for p in written[:6]]  # GLUE's are train.tsv in every task folder
    more = ", ..." if len(written) > 6 else ""
    print(f"{config.out}: {len(written)} file(s) written" + (f" ({', '.join(names)}{more})" if written else
                                                             ", all there already"))


def cmd_convert(args) -> None:
    from bertkit.tf_checkpoint import ConvertConfig, convert

    done = convert(dataclass_from_args(ConvertConfig, args))
    casing = "" if done["lowercase"] is None else f", {'uncased' if done['lowercase'] else 'cased'} vocabulary"
    print(f"wrote {done['out']} ({done['to']} layout): {done['architecture']}{casing}; {', '.join(done['files'])}")


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


def cmd_crossval(args) -> None:
    from bertkit.tasks.crossval import crossval
    from bertkit.tasks.finetune import FinetuneConfig

    print(crossval(dataclass_from_args(FinetuneConfig, args))["table"], end="")


def cmd_soup(args) -> None:
    from bertkit.tasks.soup import SoupConfig, soup

    print(soup(dataclass_from_args(SoupConfig, args))["table"], end="")


def cmd_prune(args) -> None:
    from bertkit.tasks.prune import PruneConfig, prune

    print(prune(dataclass_from_args(PruneConfig, args))["table"], end="")


def cmd_probe(args) -> None:
    from bertkit.tasks.finetune import FinetuneConfig
    from bertkit.tasks.probe import ProbeConfig, probe

    print(probe(dataclass_from_args(ProbeConfig, args), dataclass_from_args(FinetuneConfig, args))["table"], end="")


def cmd_glue(args) -> None:
    from bertkit.tasks.glue import GlueConfig, glue

    print(glue(dataclass_from_args(GlueConfig, args))["table"])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # its imports take torch's second or two, which Ctrl-C may cut short
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="bertkit: %(message)s")
        resolve_hub_ids(args)
        args.func(args)
    except BertkitError as e:
        print(f"bertkit: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `bertkit predict ... | head`: the reader has gone, which is no error of ours to show
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        return 141  # as a tool that SIGPIPE ends: 128 + 13
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, shown with its traceback
            raise
        # a path no check before it caught: a folder this user cannot create, a file where a folder should be
        print(f"bertkit: error: {one_line(str(e.filename))}: cannot use it ({e.strerror or e}); expected a path this "
              "user can read and write", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training loop says where it saved its checkpoint
        status = getattr(e, "status", 130)  # 143 after SIGTERM
        said = "terminated" if status == 143 else "interrupted"
        print(f"bertkit: {said}" + (f": {one_line(str(e))}" if str(e) else ""), file=sys.stderr)
        return status
    return 0


def resolve_hub_ids(args: argparse.Namespace) -> None:
    """A model folder (or, for a tokenizer, a folder) given as a Hugging Face Hub id, not on disk: fetched here, so
    the command, and the config it saves, read the local folder (the snapshot of the revision used). One that
    cannot be fetched is left as given: the command's own checks of its flags come first, and its model's loading
    then says why."""
    from bertkit import hub

    for flag, weights in (("model_dir", True), ("tokenizer", False)):
        value = getattr(args, flag, None)
        if isinstance(value, str):
            try:
                setattr(args, flag, str(hub.resolve(value, weights)))
            except BertkitError:
                pass


def one_line(message: str) -> str:
    """A message that echoes a user's value (a path, a flag) keeps its line breaks visible but on one line."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


if __name__ == "__main__":
    sys.exit(main())
