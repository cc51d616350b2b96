"""`autobatch client`: send inputs to a route of the serve app and print one answer per input.

    autobatch client resnet50 cat.jpg dog.png [--url URL]
    autobatch client llama_int4 "Once upon a time" --max-new-tokens 16
    autobatch client resnet50 --tuning
    autobatch client resnet50 cat.jpg dog.png --protocol v2 [--transport grpc]

The simple routes go through http_client.py; --protocol v2 hands over to oip_commands.py. This
module sits above both, so neither imports the other's command.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from .http_client import DEFAULT_TIMEOUT_S, DEFAULT_URL, AsyncClient, ClientError, Unreachable, remote_refusal, route_path
from .oip_commands import cmd_client_v2


def _label(item: str) -> str:
    return item if os.path.isfile(item) else json.dumps(item if len(item) <= 40 else item[:37] + "...")


def cmd_client(args) -> int:
    grpc = getattr(args, "protocol", "simple") == "v2" and getattr(args, "transport", "http") == "grpc" and not args.tuning
    refused = remote_refusal(args.grpc_url, args.allow_remote, "--grpc-url") if grpc else \
        remote_refusal(args.url, getattr(args, "allow_remote", False))
    if refused:
        print(f"autobatch client: error: {refused}", file=sys.stderr)
        return 2
    if getattr(args, "protocol", "simple") == "v2" and not args.tuning:
        return cmd_client_v2(args)
    if not args.tuning and not args.inputs:
        print("autobatch client: error: give at least one INPUT (an image file, or a prompt for an LLM route), "
              "or --tuning", file=sys.stderr)
        return 2
    try:
        route = route_path(args.route)
    except ValueError as exc:
        print(f"autobatch client: error: {exc}", file=sys.stderr)
        return 2

    async def go():
        async with AsyncClient(args.url, timeout=args.timeout) as client:
            if args.tuning:
                return [await client.tuning(route)]
            return await client.predict_many(route, args.inputs, max_new_tokens=args.max_new_tokens)

    try:
        answers = asyncio.run(go())
    except ClientError as exc:  # --tuning, or Unreachable
        print(f"autobatch client: error: {exc}", file=sys.stderr)
        return 2
    if args.tuning:
        print(json.dumps(answers[0], indent=1))
        return 0
    failed = 0
    for item, answer in zip(args.inputs, answers):
        if isinstance(answer, Unreachable):
            print(f"autobatch client: error: {answer}", file=sys.stderr)
            return 2
        if isinstance(answer, ClientError):
            failed += 1
            print(f"{_label(item)}: error {answer.status}: {answer.message}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"input": item, "answer": answer}))
        else:
            print(f"{_label(item)}: {json.dumps(answer)}")
    return 1 if failed else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("route", help="the model's route, e.g. resnet50, vit_b_16, yolo11n_pose, llama_int4")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files (JPEG/PNG/WebP); for an LLM route, prompts (an INPUT that is no file is sent as a prompt)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the serve app (default {DEFAULT_URL}, or $AUTOBATCH_URL)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="LLM routes: tokens to generate per prompt")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    p.add_argument("--tuning", action="store_true", help="print the route's tuning (GET /<route>/tuning) instead")
    p.add_argument("--json", action="store_true", help="one JSON object per line: {input, answer}")
    p.add_argument("--allow-remote", action="store_true",
                   help="send to a non-loopback --url / --grpc-url (plain HTTP/gRPC, no authentication)")
    p.add_argument("--protocol", choices=["simple", "v2"], default="simple",
                   help="simple: one POST per input to the route; v2: the Open Inference Protocol, all inputs in "
                        "one request of that many samples")
    p.add_argument("--transport", choices=["http", "grpc"], default="http", help="v2: HTTP (--url) or gRPC (--grpc-url)")
    p.add_argument("--grpc-url", default=os.environ.get("AUTOBATCH_GRPC_URL", "127.0.0.1:9000"),
                   help="v2 over gRPC: host:port (default 127.0.0.1:9000, or $AUTOBATCH_GRPC_URL)")


def register(subparsers) -> None:
    """Adds `autobatch client` (autobatch/cli.py calls it)."""
    p = subparsers.add_parser("client", help="send images or prompts to a served model and print the answers",
                              description="Send inputs to a route of the serve app (all at once, so they can batch) "
                                          "and print one answer per input.")
    add_arguments(p)
    p.set_defaults(func=cmd_client)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autobatch.client.command", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return cmd_client(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
