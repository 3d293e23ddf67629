"""The run report's Jinja2 templates, kept as Python strings: Flower's app bundles (FABs) carry only .py,
.toml, .md, .json and .yaml files, and the ServerApp writes the report from the bundle in deployment."""

TEMPLATES: dict[str, str] = {
    'base.html.j2': r'''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="magnet-fl report">
<title>{% block title %}{% endblock %}</title>
<style>
  :root { --fg: #1d2330; --muted: #5b6472; --line: #d8dde5; --bg: #ffffff; --soft: #f4f6f9; --warn: #8a4b00;
          --warnbg: #fff3dc; --bad: #a31d1d; --badbg: #fde8e8; --ok: #1f6b36; }
  * { box-sizing: border-box; }
  body { margin: 0; color: var(--fg); background: var(--bg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI",
         "DejaVu Sans", sans-serif; }
  header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); }
  header h1 { margin: 0 0 4px; font-size: 22px; }
  header p { margin: 2px 0; color: var(--muted); }
  nav { padding: 8px 28px; background: var(--soft); border-bottom: 1px solid var(--line); position: sticky; top: 0; }
  nav a { margin-right: 16px; color: var(--fg); text-decoration: none; font-weight: 600; }
  main { padding: 6px 28px 40px; max-width: 1280px; }
  section { margin-top: 22px; }
  h2 { font-size: 18px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
  h3 { font-size: 15px; margin: 16px 0 6px; }
  table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
  th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
  th { background: var(--soft); font-weight: 600; }
  td.reason { min-width: 340px; max-width: 560px; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; word-break: break-all; }
  .banner { margin: 10px 28px 0; padding: 10px 14px; border: 2px solid #d99a2b; background: var(--warnbg);
            color: var(--warn); font-weight: 700; }
  .muted { color: var(--muted); }
  .bad { color: var(--bad); }
  .ok { color: var(--ok); }
  .tag { display: inline-block; white-space: nowrap; padding: 0 6px; margin: 1px 2px; border-radius: 3px; background: var(--soft);
         border: 1px solid var(--line); font-size: 12px; }
  .tag.bad { background: var(--badbg); border-color: #f2b8b8; }
  .withheld { color: var(--muted); font-style: italic; }
  img.fig { max-width: 100%; border: 1px solid var(--line); margin: 6px 0; }
  details { margin: 6px 0; }
  summary { cursor: pointer; font-weight: 600; }
  .note { background: var(--soft); border-left: 3px solid var(--line); padding: 6px 10px; margin: 8px 0; }
</style>
</head>
<body>
<header>
  <h1>{% block heading %}{% endblock %}</h1>
  {% block subheading %}{% endblock %}
</header>
{% if generated %}
<div class="banner" id="generated-notice">{{ generated_notice }}: every number below comes from generated data.</div>
{% endif %}
<nav>{% block nav %}{% endblock %}</nav>
<main>
{% block content %}{% endblock %}
</main>
</body>
</html>
''',
    'report.html.j2': r'''{% extends "base.html.j2" %}
{% set generated = r.generated %}
{% macro metric(m) -%}
{{ m.value|num }}{% if m.low is not none and m.high is not none %} <span class="muted">[{{ m.low|num }}, {{ m.high|num }}]</span>{% endif %}
{%- endmacro %}
{% macro who(entries, cls="") -%}
{% for e in entries %}<span class="tag {{ cls }}">{{ e.site }}{% if e.node is not none and e.site != "node" ~ e.node %} · node {{ e.node }}{% endif %}</span>{% if e.reason %}: {{ e.reason }}{% if not loop.last %}<br>{% endif %}{% endif %}{% endfor %}
{%- endmacro %}
{% block title %}magnet-fl report: {{ r.run_dir.name }}{% endblock %}
{% block heading %}magnet-fl {{ "simulation" if r.kind == "simulation" else "federated run" }} report{% endblock %}
{% block subheading %}
<p>Run directory <code>{{ r.run_dir }}</code> · report written {{ created }}{% if r.wall_seconds %} · run took {{ r.wall_seconds|num(1) }} s{% endif %}</p>
{% for n in r.notes %}<p class="muted">{{ n }}</p>{% endfor %}
{% endblock %}
{% block nav %}
<a href="#configuration">Configuration</a>
{% if comparison %}<a href="#comparison">Comparison</a>{% endif %}
<a href="#rounds">Rounds</a><a href="#sites">Sites</a><a href="#privacy">Privacy</a><a href="#model">Model</a>
{% endblock %}
{% block content %}
<section id="configuration">
<h2>Configuration</h2>
{% for label, fps in fingerprints.items() if fps %}
<p>Configuration fingerprint{% if fingerprints|length > 1 %} of <b>{{ label }}</b>{% endif %}: {% for fp in fps %}<code>{{ fp }}</code>{% if not loop.last %}, {% endif %}{% endfor %}
{% if fps|length > 1 %}<span class="bad"> (the rounds of this run were made under different configurations)</span>{% endif %}</p>
{% endfor %}
{% if computed_fingerprint %}
<p>Configuration fingerprint: <code>{{ computed_fingerprint }}</code> <span class="muted">({% if computed_fingerprint == r.checkpoint_fingerprint %}from the checkpoint{% else %}sha256 of the configuration below, computed by the report: the run records carry none{% endif %})</span></p>
{% endif %}
{% for title, settings in r.config.items() %}
<h3>{{ title|capitalize }}</h3>
<table>
{% for key, value in settings.items() %}
<tr><th>{{ key|replace("_", " ") }}</th><td>{% if value is none %}<span class="muted">n/a</span>{% else %}{{ value|show }}{% endif %}</td></tr>
{% endfor %}
</table>
{% else %}
<p class="muted">No configuration was recorded with this run.</p>
{% endfor %}
</section>

{% if comparison %}
<section id="comparison">
<h2>Comparison: federated vs centralized vs local-only</h2>
<p class="muted">Same sites, same patients, same seeds; mean ± sample standard deviation (ddof 1) over seeds. Every method is evaluated twice, and the confusion matrices each site releases (groups under the minimum count k withheld) are summed, so metrics are those of the pooled predictions. <b>Own sites' test patients</b>: each site scores its own test patients with the model it would use (local-only and personalized: its own model; the others: the one global model). <b>Consortium test patients</b>: every model of the method is scored on every site's test patients (for one global model, the same patients as above); a local-only model that only learned its own site's label mix or missingness scores high on its own site and low here. "Pooled over" gives, per seed, the test sites that released the group and their distinct test patients (and how many models were scored): groups of different rows can cover different sites. AUROC is the midpoint of the interval the score histograms allow; AUPRC is not released by the sites (n/a).</p>
{% if fig_comparison %}<img class="fig" alt="MCC per method" src="{{ fig_comparison }}">{% endif %}
<table>
<tr><th>method</th><th>evaluation</th><th>test patients</th><th>pooled over</th>{% for m in metrics %}<th>{{ m|upper }}</th>{% endfor %}<th>seeds</th></tr>
{% for row in comparison %}
<tr><td>{{ row.label }}</td><td>{{ row.evaluation }}</td><td>{{ row.group }}</td><td>{{ row.pooled_over }}</td>
{% for m in metrics %}{% set c = row.cells[m] %}<td class="n">{% if c.mean is none %}n/a{% else %}{{ c.mean|num }} ± {{ c.std|num }}{% endif %}</td>{% endfor %}
<td class="n">{{ row.cells.mcc.n }}</td></tr>
{% endfor %}
</table>
</section>
{% endif %}

<section id="rounds">
<h2>Rounds</h2>
<p class="muted">Per round: the global test metrics pooled over the sites' evaluation counts (bounds in brackets where scores were binned), the sites whose update was aggregated, rejected (with the reason) and failed.</p>
{% if fig_rounds %}<img class="fig" alt="global metrics per round" src="{{ fig_rounds }}">{% endif %}
{% for label, rows in histories.items() %}
<details{% if loop.first %} open{% endif %}>
<summary>{{ label }}: {{ rows|length }} round(s){% set nrej = rows|map(attribute="rejected")|map("length")|sum %}{% set nfail = rows|map(attribute="failed")|map("length")|sum %}{% if nrej %}, <span class="bad">{{ nrej }} rejected update(s)</span>{% endif %}{% if nfail %}, <span class="bad">{{ nfail }} failure(s)</span>{% endif %}</summary>
<h3>Global metrics</h3>
<table>
<tr><th>round</th><th>seconds</th><th>train loss</th>{% for m in metrics %}<th>{{ m|upper }}</th>{% endfor %}<th>held-out MCC</th>{% if rows|selectattr("pooled_over")|list %}<th>evaluation pooled over</th>{% endif %}</tr>
{% for row in rows %}
<tr><td class="n">{{ row.round }}</td><td class="n">{{ row.seconds|num(1) }}</td><td class="n">{{ row.train_loss|num }}</td>
{% for m in metrics %}<td class="n">{{ metric(row.metrics[m]) }}</td>{% endfor %}
<td class="n">{{ row.server_mcc|num }}</td>{% if rows|selectattr("pooled_over")|list %}<td>{{ row.pooled_over }}</td>{% endif %}</tr>
{% endfor %}
</table>
<h3>Sites per round</h3>
<table>
<tr><th>round</th><th>aggregated</th><th>rejected (reason)</th><th>failed (reason)</th>{% for col, title in optional_columns.items() if rows|selectattr(col)|list %}<th>{{ title }}</th>{% endfor %}</tr>
{% for row in rows %}
<tr><td class="n">{{ row.round }}</td><td>{{ who(row.accepted) }}</td><td class="reason">{{ who(row.rejected, "bad") }}</td><td class="reason">{{ who(row.failed, "bad") }}</td>
{% for col in optional_columns if rows|selectattr(col)|list %}<td>{{ row[col] }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% if rows and rows[0].server_mcc is not none %}<p class="muted">Held-out MCC: the server's own check on the simulated cohort's held-out patients (simulations only).</p>{% endif %}
</details>
{% else %}
<p class="muted">No round has finished yet.</p>
{% endfor %}
</section>

<section id="sites">
<h2>Sites</h2>
<h3>Participation</h3>
<table>
<tr><th>site</th><th>rounds aggregated</th><th>updates rejected</th><th>rounds failed</th></tr>
{% for site, p in participation.items() %}
<tr><td>{{ site }}</td><td class="n">{{ p.accepted }}</td><td class="n {{ 'bad' if p.rejected }}">{{ p.rejected }}</td><td class="n {{ 'bad' if p.failed }}">{{ p.failed }}</td></tr>
{% endfor %}
</table>
<h3>Data: modality availability and class balance</h3>
<p class="muted">Source: {{ r.site_data_note }}. Aggregates only: a count of 1 to k−1 = {{ r.min_count - 1 }} patients is withheld, and so is any count from which such a count follows by subtraction (k = {{ r.min_count }}).</p>
{% if r.site_data %}
{% if fig_availability %}<img class="fig" alt="modality availability per site" src="{{ fig_availability }}">{% endif %}
{% set splits, mods, classes = site_columns %}
<table>
<tr><th rowspan="2">site</th><th rowspan="2">patients</th>{% if splits %}<th colspan="{{ splits|length }}">split</th>{% endif %}<th colspan="{{ mods|length + 1 }}">holding the modality</th><th colspan="{{ classes|length }}">class</th></tr>
<tr>{% for s in splits %}<th>{{ s }}</th>{% endfor %}{% for m in mods %}<th>{{ m }}</th>{% endfor %}<th>all modalities</th>{% for c in classes %}<th>{{ c }}</th>{% endfor %}</tr>
{% for site, d in r.site_data.items() %}
{% if d.withheld_site %}
<tr><td>{{ site }}</td><td class="withheld" colspan="{{ 2 + splits|length + mods|length + classes|length }}">withheld: fewer than k patients</td></tr>
{% else %}
<tr><td>{{ site }}</td><td class="n">{{ d.patients }}</td>
{% for s in splits %}<td class="n{{ ' withheld' if d.splits.get(s) is none }}">{{ d.splits.get(s)|count }}</td>{% endfor %}
{% for m in mods %}<td class="n{{ ' withheld' if d.modalities.get(m) is none }}">{{ d.modalities.get(m)|pct(d.patients) }}</td>{% endfor %}
<td class="n{{ ' withheld' if d.complete is none }}">{{ d.complete|pct(d.patients) }}</td>
{% for c in classes %}<td class="n{{ ' withheld' if d.classes.get(c) is none }}">{{ d.classes.get(c)|pct(d.patients) }}</td>{% endfor %}</tr>
{% endif %}
{% endfor %}
</table>
{% else %}
<p class="muted">No per-site data summary is available for this run.</p>
{% endif %}
{% if site_metrics %}
<h3>Per-site test metrics, last round{% if histories|length > 1 %} of {{ first_label }}{% endif %}</h3>
<table>
<tr><th>site</th><th>test patients</th>{% for m in metrics %}<th>{{ m|upper }}</th>{% endfor %}</tr>
{% for site, m in site_metrics.items() %}
{% if m.num is none %}
<tr><td>{{ site }}</td><td class="withheld" colspan="{{ metrics|length + 1 }}">withheld: fewer than k test patients</td></tr>
{% else %}
<tr><td>{{ site }}</td><td class="n">{{ m.num }}</td>{% for x in metrics %}<td class="n">{{ m[x]|num }}</td>{% endfor %}</tr>
{% endif %}
{% endfor %}
</table>
{% endif %}
</section>

<section id="privacy">
<h2>Privacy settings in force</h2>
<table>
<tr><th>setting</th><th>value</th><th>source</th></tr>
{% for p in privacy %}
<tr><td>{{ p.setting }}</td><td>{{ p.value }}</td><td class="muted">{{ p.source }}</td></tr>
{% endfor %}
</table>
</section>

<section id="model">
<h2>Model</h2>
{% if r.package %}
<p>Model package recorded by the run:</p>
<table>
{% for k, v in r.package.items() %}<tr><th>{{ k|replace("_", " ") }}</th><td><code>{{ v }}</code></td></tr>{% endfor %}
</table>
{% endif %}
{% if packages %}
<p>Model package{{ "s" if packages|length > 1 }} and signature{{ "s" if packages|length > 1 }} written by this run:</p>
{% elif not r.package %}
<p class="muted">No model package (*.magnet, model.pkg*) or signature was written by this run; the weights are listed below.</p>
{% endif %}
<table>
<tr><th>file</th><th>size</th><th>sha256</th><th>fields</th></tr>
{% for a in r.artefacts %}
<tr><td><code>{{ a.path }}</code></td><td class="n">{{ a.bytes|bytes }}</td><td><code>{{ a.sha256 }}</code></td>
<td>{% for k, v in a.fields.items() %}<b>{{ k }}</b>: <code>{{ v }}</code>{% if not loop.last %}<br>{% endif %}{% endfor %}</td></tr>
{% else %}
<tr><td colspan="4" class="muted">no model file in the run directory yet</td></tr>
{% endfor %}
</table>
</section>
{% endblock %}
''',
    'site_report.html.j2': r'''{% extends "base.html.j2" %}
{% macro items_table(items) -%}
<table>
<tr><th>name</th><th>kind</th><th>shape</th><th>size</th></tr>
{% for it in items %}<tr><td><code>{{ it.name }}</code></td><td>{{ it.kind }}</td><td class="mono">{{ it.shape }}</td><td class="n">{{ it.bytes|bytes }}</td></tr>
{% else %}<tr><td colspan="4" class="muted">nothing</td></tr>{% endfor %}
</table>
{%- endmacro %}
{% macro kinds(ks) -%}
{% for k in ks %}<span class="tag">{{ k.kind }}: {{ k.count }} item{{ "s" if k.count != 1 }}, {{ k.bytes|bytes }}</span>{% else %}<span class="muted">nothing</span>{% endfor %}
{%- endmacro %}
{% block title %}magnet-fl site report: {{ site }}{% endblock %}
{% block heading %}Site report: {{ site }}{% endblock %}
{% block subheading %}
<p>What this site sent to the coordinator and received from it, message by message: the name, kind, shape and size of everything that left the site, as the site logged it. Values are never logged or shown.</p>
<p class="muted">Written {{ created }}{% if run_dir %} from the run directory <code>{{ run_dir }}</code>{% endif %}</p>
{% endblock %}
{% block nav %}
<a href="#site-overview">Overview</a><a href="#site-messages">Messages</a><a href="#site-coordinator">Coordinator's record</a>
{% endblock %}
{% block content %}
<section id="site-overview">
<h2>Overview</h2>
{% if logs %}
<table>
<tr><th>messages answered</th><td class="n">{{ messages }}</td></tr>
<tr><th>sent by the site in total</th><td class="n">{{ total_sent|bytes }}</td></tr>
<tr><th>received from the coordinator in total</th><td class="n">{{ total_received|bytes }}</td></tr>
<tr><th>kinds of what left the site</th><td>{{ kinds(kinds_sent) }}</td></tr>
</table>
{% if fig_traffic %}<img class="fig" alt="bytes per round" src="{{ fig_traffic }}">{% endif %}
{% else %}
<p class="note">No site log (site_log.jsonl) or audit log (audit.jsonl) of this site was found: the ClientApp writes a site log when its node config names a log directory, an audit log in the state folder of the site policy it names. Below is only what the coordinator recorded about this site.</p>
{% endif %}
</section>

<section id="site-messages">
<h2>Messages, round by round</h2>
{% for label, rows in logs.items() %}
<details{% if loop.first %} open{% endif %}>
<summary>{{ label }}: {{ rows|length }} message(s)</summary>
<table>
<tr><th>round</th><th>kind</th><th>time</th><th>sent by the site</th><th>received from the coordinator</th></tr>
{% for row in rows %}
<tr><td class="n">{{ row.round }}</td><td>{{ row.kind }}</td><td class="muted">{{ row.time|when }}</td>
<td>{{ kinds(row.sent_kinds) }}<br><b>{{ row.sent_bytes|bytes }}</b>{% if row.error %}<br><span class="bad">error: {{ row.error }}</span>{% endif %}</td>
<td>{{ kinds(row.received_kinds) }}<br><b>{{ row.received_bytes|bytes }}</b></td></tr>
{% endfor %}
</table>
{% if rows %}
{% set last = rows[-1] %}
<details><summary>every item of the last message (round {{ last.round }}, {{ last.kind }})</summary>
<h3>sent</h3>{{ items_table(last.sent) }}
<h3>received</h3>{{ items_table(last.received) }}
</details>
{% endif %}
</details>
{% else %}
<p class="muted">No site log.</p>
{% endfor %}
</section>

<section id="site-coordinator">
<h2>The coordinator's record of this site</h2>
{% if coordinator %}
<table>
<tr><th>run</th><th>round</th><th>update</th><th>reason</th><th>evaluated</th></tr>
{% for c in coordinator %}
<tr><td>{{ c.run }}</td><td class="n">{{ c.round }}</td><td class="{{ 'bad' if c.status in ('rejected', 'failed') else 'ok' if c.status == 'aggregated' else 'muted' }}">{{ c.status }}</td><td>{{ c.reason }}</td><td>{{ "yes" if c.evaluated else "no" }}</td></tr>
{% endfor %}
</table>
{% else %}
<p class="muted">The coordinator's run records are not available on the site's side; run <code>magnet-fl report RUN_DIR --site {{ site }}</code> on the coordinator's run directory to add them.</p>
{% endif %}
</section>
{% endblock %}
''',
}
