"""What operators run beside jobs: status, reports and metrics tables, the demo and the tiny
model it runs on."""
