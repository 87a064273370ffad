class ReportService:
    """Loads sales data, builds three kinds of report and e-mails them (excerpt of 40 methods)."""

    def __init__(self, db, smtp):
        self.db = db
        self.smtp = smtp

    def load_sales(self, month):
        return self.db.query("SELECT * FROM sales WHERE month = ?", month)

    def monthly_report(self, month):
        rows = self.load_sales(month)
        total = sum(r["amount"] for r in rows)
        lines = [f"{r['date']}: {r['amount']:.2f}" for r in rows]
        return "\n".join(lines + [f"TOTAL {total:.2f}"])

    def send_monthly(self, month, to):
        body = self.monthly_report(month)
        self.smtp.send(to=to, subject=f"Sales {month}", body=body)
