"""List filters whose choices come from walking an index (cheap on tables of millions of rows),
instead of Django's ``SELECT DISTINCT`` over the whole table."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from . import operations


class IndexedValuesFilter(admin.SimpleListFilter):
    """Filter on ``column`` of ``table``; choices are its distinct values, read from its index."""

    table: str
    column: str

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(value, value) for value in operations.distinct_values(self.table, self.column)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset if value is None else queryset.filter(**{self.column: value})


class StatusFilter(IndexedValuesFilter):
    title = "status"
    parameter_name = "status"
    table, column = "results", "status"


class TaskNameFilter(IndexedValuesFilter):
    title = "task name"
    parameter_name = "name"
    table, column = "results", "name"


class MessageQueueFilter(IndexedValuesFilter):
    title = "queue"
    parameter_name = "queue"
    table, column = "messages", "queue"


class DeadLetterQueueFilter(IndexedValuesFilter):
    title = "queue"
    parameter_name = "queue"
    table, column = "dead_letters", "queue"
