"""placeholder"""
import click
@click.command()
def bench_inference() -> None:
    pass
