"""A probe, not part of Concord: how CoGrad's correction ``D = A - P`` lies against each task's own
contribution ``c_k G_k`` at ``z``, on every step that calls ``CoGrad.aggregate`` (the statistics steps),
on rank 0. Python imports ``sitecustomize`` at start-up in every process, so the torchrun workers of
``concord train`` load it too:

    COGRAD_PROBE=/tmp/probe.jsonl PYTHONPATH=docs/quality/cograd-strength/probe \
        concord train --config loans balancer.name=cograd

Each line: ``kappa``; ``ratio`` = ||D|| / ||P||; per task ``along`` = <D, c_k G_k> / ||c_k G_k||^2 (the
share of its contribution the correction adds along it, negative where it removes), ``share_of_P`` =
||c_k G_k|| / ||P||, and ``against``, the share of elements where the aggregate's sign opposes the
task's element while ``P``'s did not."""
import json, os
if os.environ.get("RANK") == "0" and os.environ.get("COGRAD_PROBE"):
    from concord.balancing import cograd as _cg
    _orig = _cg.CoGrad.aggregate
    _out = open(os.environ["COGRAD_PROBE"], "a")
    def aggregate(self, grads, stats, z=None, early=None):
        a = _orig(self, grads, stats, z, early)
        live = [k for k, g in enumerate(grads) if g is not None and stats.active[k]]
        if live and self.last_telemetry.get("kappa", 0.0):
            gs = {k: grads[k].double() for k in live}
            a64 = a.double()
            p = sum(self.weights[k] * gs[k] for k in live)
            d = a64 - p
            row = {"kappa": self.last_telemetry["kappa"], "ratio": float(d.norm() / p.norm())}
            for k in live:
                contrib = float(self.weights[k]) * gs[k]
                row[self.task_names[k]] = {
                    # the correction along task k's own contribution, as a share of it (negative: removes)
                    "along": float((d * contrib).sum() / (contrib * contrib).sum()),
                    "share_of_P": float(contrib.norm() / p.norm()),
                    # elements where the aggregate points against task k's element while P did not
                    "against": float(((a64 * gs[k] < 0) & (p * gs[k] > 0)).double().mean()),
                }
            _out.write(json.dumps(row) + "\n"); _out.flush()
        return a
    _cg.CoGrad.aggregate = aggregate
