"""The Alembic migrations and the SQLAlchemy models describe the same schema, on both backends."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage import db as dbmod
from storage.models import Base


def _diff(db: dbmod.Database) -> list:
    with db.write.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_migrations_match_the_models(db_url: str) -> None:
    db = dbmod.connect(db_url)
    try:
        dbmod.upgrade(db)
        assert dbmod.current_revision(db) == dbmod.head_revision()
        assert _diff(db) == []
    finally:
        db.dispose()


def test_index_methods_and_predicates_alembic_does_not_compare(db_url: str) -> None:
    """Alembic's comparison ignores index methods and partial-index predicates: check the ones the
    hot path relies on (migrations 0005 and 0006) in the database itself, against the models."""
    db = dbmod.connect(db_url)
    try:
        dbmod.upgrade(db)
        with db.read.connect() as conn:
            if db.is_sqlite:
                sql = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'index'").all())
                assert "USING" not in sql["ix_requests_created"].upper()
                log_index = sql["ix_audit_log_created"]
            else:
                method = conn.exec_driver_sql(
                    "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
                    "WHERE c.relname = 'ix_requests_created' AND c.relnamespace = current_schema()::regnamespace"
                ).scalar_one()
                assert method == "brin"
                log_index = conn.exec_driver_sql(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_audit_log_created' "
                    "AND schemaname = current_schema()").scalar_one()
        assert "claimed" in log_index and "posting" in log_index
        model = Base.metadata.tables["requests"].indexes
        assert next(i for i in model if i.name == "ix_requests_created").dialect_options["postgresql"]["using"] == "brin"
    finally:
        db.dispose()


def test_downgrade_to_base_and_back(db_url: str) -> None:
    db = dbmod.connect(db_url)
    try:
        dbmod.upgrade(db)
        dbmod.downgrade(db, "base")
        tables = set(sa.inspect(db.write).get_table_names()) - {"alembic_version"}
        assert tables == set()
        dbmod.upgrade(db)
        assert _diff(db) == []
    finally:
        db.dispose()


def test_a_model_change_without_a_migration_is_detected(db_url: str) -> None:
    """Guard the guard: a column added to the models only must show up as a difference."""
    db = dbmod.connect(db_url)
    try:
        dbmod.upgrade(db)
        extra = sa.Column("not_migrated", sa.Integer)
        Base.metadata.tables["cursors"].append_column(extra)
        try:
            diff = _diff(db)
        finally:
            Base.metadata.tables["cursors"]._columns.remove(extra)
        assert any(d[0] == "add_column" and d[3].name == "not_migrated" for d in diff)
    finally:
        db.dispose()
