"""`picotron-jax data prepare`: tokenise a corpus into a token store (prepare.py)."""

from __future__ import annotations

from picotron_jax.data.store import DEFAULT_SHARD_TOKENS


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="token stores: `data prepare` tokenises a corpus into shards + an index")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="tokenise --source into a sharded token store at --out (resumable)")
    q.add_argument("--source", required=True,
                   help="stdlib, a text file, a folder, a .jsonl/.parquet file, or a glob such as 'data/**/*.jsonl'")
    q.add_argument("--out", required=True, help="the store: a local folder, s3://bucket/prefix or gs://bucket/prefix")
    q.add_argument("--tokenizer", default="byte", help="byte (default) or a Hugging Face tokenizer.json")
    q.add_argument("--text-field", default="text", help="field holding the text in .jsonl / .parquet rows")
    q.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default 2^20)")
    q.add_argument("--workers", type=int, default=0, help="tokenising processes (default: the CPU count)")


def cmd_data(args) -> int:
    import os

    from picotron_jax.data.prepare import prepare_store

    prepare_store(args.source, args.out, tokenizer=args.tokenizer, text_field=args.text_field,
                  shard_tokens=args.shard_tokens, workers=args.workers or (os.cpu_count() or 1))
    print(f"train with data.source={args.out} data.tokenizer={args.tokenizer}")
    return 0


COMMANDS = {"data": cmd_data}
