"""Write a small synthetic sample in the raw AdvertiseGen format (stdlib only, deterministic).

Each record is ``{"content": "类型#裙*颜色#白色*...", "summary": "..."}``. The summary is a pure
function of the content: every attribute value maps to one fixed phrase, and the phrases are
joined in attribute order with fixed connective text. A tiny model can therefore learn the
mapping in minutes on a CPU, and ROUGE on the test split shows clearly whether it did.

    python scripts/make_advertisegen_sample.py [--output_dir data/advertisegen] [--seed 42]
"""

import argparse
import itertools
import json
import os
import random

DEFAULT_SEED = 42
SPLIT_SIZES = {"train": 2000, "dev": 100, "test": 100}

# Attribute keys in the order they appear in a content string (the real data also leads with
# 类型). Each value maps to exactly one phrase, unique across the whole table.
PHRASES = {
    "类型": {
        "裙": "这款连衣裙裙摆灵动又飘逸",
        "裤": "这款长裤线条利落又干净",
        "上衣": "这款上衣百搭又实穿",
        "外套": "这款外套挡风又保暖",
        "衬衫": "这款衬衫清爽又精神",
        "卫衣": "这款卫衣舒适又随性",
    },
    "颜色": {
        "黑色": "经典黑色沉稳耐看",
        "白色": "纯净白色清新减龄",
        "红色": "热情红色衬托好气色",
        "蓝色": "静谧蓝色透出清凉感",
        "粉色": "温柔粉色甜美可人",
    },
    "材质": {
        "棉": "柔软棉质面料亲肤透气",
        "雪纺": "轻盈雪纺面料垂感十足",
        "牛仔布": "耐磨牛仔面料挺括有型",
        "羊毛": "细腻羊毛面料温暖厚实",
        "针织": "弹力针织面料贴身舒服",
    },
    "版型": {
        "显瘦": "显瘦剪裁修饰身形",
        "宽松": "宽松版型包容身材",
        "修身": "修身设计勾勒曲线",
        "直筒": "直筒廓形利落大方",
    },
    "图案": {
        "印花": "精致印花增添趣味",
        "条纹": "经典条纹显得干练",
        "格子": "复古格子满满学院风",
        "纯色": "纯色设计低调耐看",
        "刺绣": "细腻刺绣彰显质感",
    },
    "风格": {
        "文艺": "文艺气息扑面而来",
        "简约": "简约风格一点不单调",
        "复古": "复古韵味十足又耐看",
        "休闲": "休闲随性适合周末",
        "通勤": "通勤穿着得体大方",
    },
}
KEYS = list(PHRASES)
CLOSING = "，日常穿搭轻松出彩，值得拥有。"


def summary_for(content: str) -> str:
    """The summary the generator writes for a content string (also used by the tests)."""
    phrases = []
    for pair in content.split("*"):
        key, value = pair.split("#")
        phrases.append(PHRASES[key][value])
    return "，".join(phrases) + CLOSING


def all_contents() -> list[str]:
    """Every content: one 类型 plus 1-3 other attributes with distinct keys, in key order."""
    contents = []
    others = KEYS[1:]
    for kind in PHRASES["类型"]:
        for n in (1, 2, 3):
            for keys in itertools.combinations(others, n):
                for values in itertools.product(*(PHRASES[k] for k in keys)):
                    pairs = [f"类型#{kind}"] + [f"{k}#{v}" for k, v in zip(keys, values)]
                    contents.append("*".join(pairs))
    return contents


def make_sample(seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """Draw distinct contents for all splits at once, so dev/test never repeat a train content."""
    rng = random.Random(seed)
    drawn = rng.sample(all_contents(), sum(SPLIT_SIZES.values()))
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        chunk = drawn[start:start + size]
        splits[name] = [{"content": c, "summary": summary_for(c)} for c in chunk]
        start += size
    return splits


def write_sample(output_dir: str, seed: int = DEFAULT_SEED) -> None:
    os.makedirs(output_dir, exist_ok=True)
    for name, records in make_sample(seed).items():
        path = os.path.join(output_dir, f"{name}.jsonl")
        # newline="\n" keeps the bytes identical on every platform.
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} records to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--output_dir", default=os.path.join(here, "..", "data", "advertisegen"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    write_sample(os.path.normpath(args.output_dir), args.seed)


if __name__ == "__main__":
    main()
