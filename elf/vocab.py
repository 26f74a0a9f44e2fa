"""The token ids every stage agrees on: the T5 vocabulary convention (elf-method §2).

<pad> = 0, </s> (EOS) = 1, <unk> = 2, as in t5-small, whose tokenizer and encoder the paper uses; a tokenizer
trained here is built to the same layout, and the scratch encoder puts its span-corruption sentinels above
the vocabulary (`elf/scratch_encoder.py`).
"""

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SPECIAL_TOKENS = 3  # pad, eos, unk
NUM_SENTINELS = 100  # <extra_id_*> tokens, as in t5-small
