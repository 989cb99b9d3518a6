"""The RabbitMQ plugin from Dask's plugin docs, run as a sluice scheduler preload.

Only the imports changed, plus a ``close`` that closes the connection (the docs'
version leaks it): ``sluice scheduler --preload examples/rabbitmq_plugin.py``.
It publishes from inside ``transition``, so every publish blocks the scheduler and a
broker that is away breaks it, exactly as in Dask; the ``sluice.sinks.rabbitmq`` sink
(issue 5) is the version that does not.
"""

import json

import click
import pika

from sluice import SchedulerPlugin


class RabbitMQPlugin(SchedulerPlugin):
    def __init__(self, host="localhost", queue="dask_task_status"):
        # Update host to be your RabbitMQ host
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.ConnectionParameters(host=host))
        self.channel = self.connection.channel()
        self.channel.queue_declare(queue=queue, durable=True)

    def transition(self, key, start, finish, *args, **kwargs):
        message = dict(
            key=key,
            start=start,
            finish=finish,
        )
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            body=json.dumps(message),
            properties=pika.BasicProperties(
                delivery_mode=2,  # make message persistent
            ),
        )

    async def close(self):
        self.connection.close()


@click.command()
@click.option("--rabbitmq-host", default="localhost")
@click.option("--rabbitmq-queue", default="dask_task_status")
def dask_setup(scheduler, rabbitmq_host, rabbitmq_queue):
    plugin = RabbitMQPlugin(rabbitmq_host, rabbitmq_queue)
    scheduler.add_plugin(plugin)
