"""LongBench (Bai et al., 2023) for users who have the official JSONL files on disk (nothing is downloaded).

Expects `<directory>/<dataset>.jsonl` as released (one JSON object a line with `input`, `context`, `answers`,
`all_classes`, `_id`, ...). Follows the official evaluation: per-dataset prompt templates and maximum new tokens,
the chat template except for the few-shot and code datasets, prompts longer than the model limit cut in the
middle (first half + last half of the tokens), and per-dataset metrics (`metrics.score`, max over references;
first line only for trec, triviaqa, samsum, lsht). The 16 English + code datasets are covered; the official
benchmark score is the unweighted mean of the dataset scores (LongBench reports it ×100; we keep [0, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import TaskInstance, build_prompt

# the official per-dataset prompt templates (LongBench config/dataset2prompt.json), English + code datasets
_SHORT_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any "
             "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
             "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
             "Answer:")
_QASPER_RULE = ("Answer the question as concisely as you can, using a single phrase or sentence if possible. If "
                "the question cannot be answered based on the information in the article, write \"unanswerable\". "
                "If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide "
                "any explanation.")
DATASET2PROMPT = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    "the question as concisely as you can, using a single phrase if possible. Do not provide any "
                    "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely "
                    "as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
                    "Question: {input}\n\nAnswer:"),
    "qasper": ("You are given a scientific article and a question. " + _QASPER_RULE + "\n\nArticle: {context}\n\n "
               + _QASPER_RULE.replace("Answer the question as", "Answer the question based on the above article "
                                      "as") + "\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": _SHORT_QA,
    "2wikimqa": _SHORT_QA,
    "musique": _SHORT_QA,
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                   "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": ("You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                   "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"),
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                      "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                      "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                      "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                      "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
                      "\n\nThe final answer is: "),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
                             "which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract."
                             "\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. "
                             "The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
                             "The answer is: "),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

DATASET2MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                  "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}

DATASET2METRIC = {"narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
                  "2wikimqa": "qa_f1", "musique": "qa_f1", "gov_report": "rouge_l", "qmsum": "rouge_l",
                  "multi_news": "rouge_l", "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l",
                  "passage_count": "count", "passage_retrieval_en": "retrieval", "lcc": "code_sim",
                  "repobench-p": "code_sim"}

DATASETS = tuple(DATASET2PROMPT)  # the 16 English + code datasets
NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # raw prompts (few-shot and code)
FIRST_LINE = ("trec", "triviaqa", "samsum", "lsht")  # predictions cut at their first newline before scoring


def truncate_middle(tok, prompt: str, max_tokens: int) -> str:
    """LongBench's truncation: if the prompt has more than max_tokens tokens, keep the first and the last
    max_tokens // 2 tokens (decoded back to text)."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return (tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True))


def load_jsonl(path: str | Path) -> list[dict]:
    """Records of one LongBench JSONL file (blank lines skipped; a broken line is an error naming it)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({e})") from None
    return out


def longbench(tok, directory: str | Path, datasets: list[str] | None = None, max_samples: int | None = None,
              max_length: int = 7500, chat: bool = True) -> list[TaskInstance]:
    """Task instances of the given datasets (default: all 16 whose file exists in `directory`).

    max_length: the model limit for the prompt in tokens (LongBench cuts longer prompts in the middle; leave
    room for the answer, e.g. 127500 for Llama-3.1-8B, 31500 for Mistral-7B; 7500 for the embedded 8K model).
    max_samples: the first N records of each file (deterministic)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"LongBench directory {str(root)!r} does not exist: pass the folder holding the "
                                f"official <dataset>.jsonl files (nothing is downloaded)")
    if datasets is None:
        datasets = [d for d in DATASETS if (root / f"{d}.jsonl").is_file()]
        if not datasets:
            raise FileNotFoundError(f"no LongBench file in {str(root)!r}: expected some of "
                                    f"{', '.join(d + '.jsonl' for d in DATASETS)}")
    out: list[TaskInstance] = []
    for name in datasets:
        if name not in DATASET2PROMPT:
            raise ValueError(f"unknown LongBench dataset {name!r}: allowed are {', '.join(DATASETS)}")
        f = root / f"{name}.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing (LongBench dataset {name!r})")
        for i, rec in enumerate(load_jsonl(f)[:max_samples]):
            prompt = DATASET2PROMPT[name].format(context=rec.get("context", ""), input=rec.get("input", ""))
            prompt = truncate_middle(tok, prompt, max_length)
            use_chat = chat and name not in NO_CHAT
            ids = build_prompt(tok, prompt, chat=use_chat) if use_chat else \
                torch.tensor([tok(prompt, add_special_tokens=True)["input_ids"]])
            answers = rec.get("answers") or []
            if isinstance(answers, str):
                answers = [answers]
            meta = {"all_classes": list(rec.get("all_classes") or []), "cut_first_line": name in FIRST_LINE,
                    "dataset": name, "length": rec.get("length")}
            out.append(TaskInstance(f"longbench_{name}", str(rec.get("_id", i)), ids, [str(a) for a in answers],
                                    DATASET2MAXLEN[name], DATASET2METRIC[name], meta))
    return out


def dataset_scores(rows) -> dict[str, float]:
    """Mean score per LongBench dataset and their unweighted mean ('average'), from (task, score) pairs."""
    by: dict[str, list[float]] = {}
    for task, s in rows:
        by.setdefault(task, []).append(float(s))
    out = {t: sum(v) / len(v) for t, v in by.items()}
    if out:
        out["average"] = sum(out.values()) / len(out)
    return out
