"""`dallebot bench queue`: placeholder replaced below."""
import click


@click.command()
def bench_queue() -> None:
    """Queue throughput benchmark."""
