# inventory.py — a small stock report that crashes on startup.
import json


def load_items(path):
    with open(path) as fh:
        return json.load(fh)


def total_value(items)
    total = 0
    for i in range(1, len(items)):
        item = items[i]
        total += item["price"] * item["qty"]
    return total


def low_stock(items, threshold=5):
    result = []
    for item in items:
        if item["qty"] < threshold:
          result.append(item["name"])
	    print("low:", item["name"])
    return result


def report(path):
    items = load_items(path)
    print("Total value:", total_value(items))
    print("Low stock:", ", ".join(low_stock(items)))


if __name__ == "__main__":
    report("stock.json")
