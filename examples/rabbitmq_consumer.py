"""Read the task-status messages the RabbitMQ sink published, as a downstream service would.

    python examples/rabbitmq_consumer.py QUEUE [--url URL] [--show N]

Takes every message waiting in QUEUE (acknowledging them), drops repeats by
``message_id`` (the sink delivers at least once), prints the first N and a count
per final state. Exits 1 if the queue does not exist.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import pika
import pika.exceptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--show", type=int, default=5, help="messages to print")
    args = parser.parse_args()
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    try:
        channel = connection.channel()
        try:
            channel.queue_declare(args.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            print(f"no queue {args.queue!r} on {args.url}", file=sys.stderr)
            return 1
        seen: set[str] = set()
        finishes: collections.Counter[str] = collections.Counter()
        while True:
            method, properties, body = channel.basic_get(args.queue)
            if method is None:  # the queue is empty
                break
            channel.basic_ack(method.delivery_tag)
            if properties.message_id in seen:
                continue
            seen.add(properties.message_id)
            event = json.loads(body)
            finishes[event.get("finish", event["kind"])] += 1
            if len(seen) <= args.show:
                what = event["kind"]
                if "finish" in event:
                    what = f"{event['start']} -> {event['finish']}"
                print(f"{properties.message_id}  {event.get('key', '')}: {what}")
    finally:
        connection.close()
    print(f"{len(seen)} events; transitions into: {dict(sorted(finishes.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
