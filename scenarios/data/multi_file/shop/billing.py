"""Invoices."""

from shop import notify


def invoice(order) -> str:
    text = f"Invoice {order.order_id}: {order.total():.2f}"
    notify.order_billed(order, text)
    return text
