"""A fixed ~100 kB sample of mixed text for tokenizer checks: prose (TinyShakespeare), digits
and numbers in many forms, code (this repository's own Rust and Python), and non-ASCII text in
several scripts, interleaved in blocks. The same bytes every run of one checkout.

    python3 scripts/mixed_text.py > /tmp/mixed.txt
"""

import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Sentences written for this sample.
NON_ASCII = [
    "Le cœur a ses raisons que la raison ne connaît point ; déjà l'été s'achève à Noël.",
    "Über den Wolken muß die Freiheit wohl grenzenlos sein — sagte die Großmutter.",
    "¿Dónde está la biblioteca? ¡Mañana iremos al país del señor Muñoz!",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "我能吞下玻璃而不伤身体。今天的天气很好，我们去公园散步吧。",
    "私はガラスを食べられます。それは私を傷つけません。東京は今日も晴れです。",
    "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요. 서울의 가을은 아름답다.",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني. صباح الخير يا أصدقائي.",
    "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती। नमस्ते दुनिया।",
    "Emoji: 🙂🚀🔥 👩‍💻 🇫🇷 ✓ ✗ ★ ☃ — and symbols ∑ ∫ √ ≤ ≥ ≠ ∞ π µ € £ ¥ ©.",
    "Ça coûte 12,50 € ou £10.99; the naïve café’s façade, résumé, coöperate, Zoë.",
    "Tiếng Việt có dấu: Xin chào thế giới, chúc bạn một ngày tốt lành.",
    "Türkçe: Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul'da ılık bir gün.",
    "עברית: אני יכול לאכול זכוכית וזה לא מזיק לי.",
    "ไทย: ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ",
]


def numbers(rng):
    forms = [
        lambda: str(rng.randint(0, 9)),
        lambda: str(rng.randint(10, 999_999_999)),
        lambda: f"{rng.randint(1, 999):,}",
        lambda: f"{rng.uniform(-1000, 1000):.{rng.randint(1, 6)}f}",
        lambda: f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}",
        lambda: f"{rng.uniform(0, 1):.3e}",
        lambda: f"0x{rng.randint(0, 2**32):08X}",
        lambda: f"{rng.randint(1, 99)}%",
        lambda: f"{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 99)}",
        lambda: f"{rng.randint(1, 999)} + {rng.randint(1, 999)} = {rng.randint(1, 2000)}",
    ]
    words = ["about", "nearly", "exactly", "at least", "roughly", "from", "to", "and", "or"]
    line = []
    for _ in range(rng.randint(6, 14)):
        line.append(rng.choice(forms)())
        if rng.random() < 0.5:
            line.append(rng.choice(words))
    return " ".join(line)


def main():
    rng = random.Random(20261130)
    prose = (ROOT / "datasets/tinyshakespeare.txt").read_text()
    code_files = sorted(ROOT.glob("crates/*/src/**/*.rs")) + sorted(ROOT.glob("scripts/*.py"))
    code = "\n".join(path.read_text() for path in code_files)
    pieces = []
    size = 0
    while size < 100_000:
        kind = rng.choice(["prose", "code", "numbers", "unicode"])
        if kind == "prose":
            start = rng.randrange(0, len(prose) - 1500)
            piece = prose[start:start + rng.randint(300, 1500)]
        elif kind == "code":
            start = rng.randrange(0, len(code) - 1500)
            piece = code[start:start + rng.randint(300, 1500)]
        elif kind == "numbers":
            piece = "\n".join(numbers(rng) for _ in range(rng.randint(2, 6)))
        else:
            piece = " ".join(rng.choice(NON_ASCII) for _ in range(rng.randint(2, 5)))
        pieces.append(piece)
        size += len(piece.encode())
    text = "\n\n".join(pieces)
    # Whole characters only, ending near 100,000 bytes.
    encoded = text.encode()[:100_000]
    print(encoded.decode(errors="ignore"), end="")


if __name__ == "__main__":
    main()
