def orders_for_customer(request, db):
    name = request.args["name"]
    customer = db.execute(f"SELECT id FROM customers WHERE name = '{name}'").fetchone()
    orders = db.execute("SELECT id FROM orders WHERE customer_id = ?", (customer[0],)).fetchall()
    result = []
    for (order_id,) in orders:
        lines = db.execute("SELECT sku, qty FROM order_lines WHERE order_id = ?", (order_id,)).fetchall()
        result.append({"id": order_id, "lines": lines})
    return {"customer": name, "orders": result}
