package metrics

// The Grafana dashboard (deploy/grafana/qbridge-dashboard.json) may use
// only the metrics and labels this package exports, and shows every qbridge_
// metric: so that renaming a metric, or adding one, fails here rather than
// leaving a dashboard with empty panels.

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/qbridge/qbridge/internal/redistest"
)

const dashboardPath = "../../deploy/grafana/qbridge-dashboard.json"

type dashboard struct {
	SchemaVersion int            `json:"schemaVersion"`
	Title         string         `json:"title"`
	UID           string         `json:"uid"`
	Panels        []dashPanel    `json:"panels"`
	Templating    dashTemplating `json:"templating"`
}

type dashDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type dashPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource *dashDatasource `json:"datasource"`
	Targets    []struct {
		RefID      string          `json:"refId"`
		Expr       string          `json:"expr"`
		Datasource *dashDatasource `json:"datasource"`
	} `json:"targets"`
	Panels []dashPanel `json:"panels"` // of a collapsed row
}

type dashTemplating struct {
	List []struct {
		Name       string          `json:"name"`
		Type       string          `json:"type"`
		Query      json.RawMessage `json:"query"`
		Definition string          `json:"definition"`
		Datasource *dashDatasource `json:"datasource"`
		AllValue   string          `json:"allValue"`
	} `json:"list"`
}

// exported returns every series name a scrape offers to PromQL, with the
// labels each has: a histogram's _bucket (with le), _sum and _count, a
// summary's own name (with quantile), _sum and _count.
func exported(s scrape) map[string]map[string]bool {
	out := map[string]map[string]bool{}
	add := func(name string, f *dto.MetricFamily, extra ...string) {
		ls := map[string]bool{"__name__": true}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				ls[l.GetName()] = true
			}
		}
		for _, e := range extra {
			ls[e] = true
		}
		out[name] = ls
	}
	for name, f := range s {
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			add(name+"_bucket", f, "le")
			add(name+"_sum", f)
			add(name+"_count", f)
		case dto.MetricType_SUMMARY:
			add(name, f, "quantile")
			add(name+"_sum", f)
			add(name+"_count", f)
		default:
			add(name, f)
		}
	}
	return out
}

func TestDashboardUsesExportedMetrics(t *testing.T) {
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}

	rs := redistest.Start(t)
	h := start(t, rs)
	names := exported(h.scrapeUntil(t, h.workload(t)))

	if d.SchemaVersion != 39 {
		t.Errorf("schemaVersion %d; want 39", d.SchemaVersion)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("uid %q, title %q: both are needed", d.UID, d.Title)
	}
	used := map[string]bool{}
	check := func(where, expr string) {
		sels, groups, err := parsePromQL(expr)
		if err != nil {
			t.Errorf("%s: %q: %v", where, expr, err)
			return
		}
		if len(sels) == 0 {
			t.Errorf("%s: %q uses no metric", where, expr)
		}
		labels := map[string]bool{}
		for _, s := range sels {
			used[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(s.name, "_bucket"), "_sum"), "_count")] = true
			used[s.name] = true
			have, ok := names[s.name]
			if !ok {
				t.Errorf("%s: %q uses %s, which this package does not export", where, expr, s.name)
				continue
			}
			for _, l := range s.labels {
				if !have[l] {
					t.Errorf("%s: %q matches label %s of %s, which has no such label", where, expr, l, s.name)
				}
			}
			for l := range have {
				labels[l] = true
			}
		}
		for _, l := range groups {
			if !labels[l] {
				t.Errorf("%s: %q groups by %s, a label none of its metrics has", where, expr, l)
			}
		}
	}

	// The variables: a Prometheus data source, and the queues.
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
		switch v.Name {
		case "datasource":
			var q string
			if v.Type != "datasource" || json.Unmarshal(v.Query, &q) != nil || q != "prometheus" {
				t.Errorf("variable datasource: type %q, query %s; want a prometheus data source variable", v.Type, v.Query)
			}
		case "queue":
			var q struct {
				Query string `json:"query"`
			}
			if err := json.Unmarshal(v.Query, &q); err != nil {
				t.Errorf("variable queue: query %s: %v", v.Query, err)
			}
			const want = "label_values(qbridge_queue_ready, queue)"
			if q.Query != want || v.Definition != want {
				t.Errorf("variable queue: query %q, definition %q; want %q", q.Query, v.Definition, want)
			}
			if v.Datasource == nil || v.Datasource.UID != "${datasource}" {
				t.Errorf("variable queue: data source %+v; want uid ${datasource}", v.Datasource)
			}
			if v.AllValue != ".*" {
				t.Errorf("variable queue: allValue %q; want .* (so that queue=\"_other\" is in All)", v.AllValue)
			}
			check("variable queue", "qbridge_queue_ready{queue=\"x\"}")
		}
	}
	for _, v := range []string{"datasource", "queue"} {
		if !vars[v] {
			t.Errorf("no variable %s", v)
		}
	}

	// The panels.
	var walk func(ps []dashPanel)
	titles := map[string]bool{}
	walk = func(ps []dashPanel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
			titles[p.Title] = true
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("%s: data source %+v; want uid ${datasource}", where, p.Datasource)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: no queries", where)
			}
			for _, q := range p.Targets {
				if q.Datasource != nil && q.Datasource.UID != "${datasource}" {
					t.Errorf("%s, query %s: data source %+v; want uid ${datasource}", where, q.RefID, q.Datasource)
				}
				check(where+", query "+q.RefID, q.Expr)
			}
		}
	}
	walk(d.Panels)
	for _, title := range []string{"Backlog", "Enqueue / ack rates", "Delivery latency", "Deliveries and redeliveries",
		"Dead-letter growth", "Oldest ready age", "Pub/sub rates", "Pub/sub drops", "gRPC request rate",
		"gRPC error rate by code", "gRPC handling time p99", "Redis pool connections"} {
		if !titles[title] {
			t.Errorf("no panel %q", title)
		}
	}

	// Every metric of this package is on the dashboard.
	var missing []string
	for name := range names {
		if strings.HasPrefix(name, "qbridge_") && !used[name] &&
			!used[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")] {
			missing = append(missing, name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("the dashboard shows nothing of %v", missing)
	}
}

// selector is a metric used in a PromQL expression and the labels it
// matches on.
type selector struct {
	name   string
	labels []string
}

var (
	groupingKeywords = []string{"by", "without", "on", "ignoring", "group_left", "group_right"}
	otherKeywords    = []string{"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end"}
	identRE          = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*`)
	matcherRE        = regexp.MustCompile(`^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`" + `)\s*(,|\})`)
)

// parsePromQL finds the metrics of a PromQL expression (with Grafana
// variables), their label matchers, and the labels named in by, without,
// on, ignoring and group_left/right clauses. It is a tokenizer, not a
// parser: enough to tell metric names from functions, keywords, labels,
// strings, numbers, durations and variables.
func parsePromQL(expr string) (sels []selector, groups []string, err error) {
	s := expr
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(s) && s[j] != c {
				if s[j] == '\\' && c != '`' {
					j++
				}
				j++
			}
			if j >= len(s) {
				return nil, nil, fmt.Errorf("unterminated string at %d", i)
			}
			i = j + 1
		case c == '$': // $var, ${var}, $__rate_interval
			i++
			if i < len(s) && s[i] == '{' {
				end := strings.IndexByte(s[i:], '}')
				if end < 0 {
					return nil, nil, fmt.Errorf("unterminated ${ at %d", i)
				}
				i += end + 1
			} else {
				i += len(identRE.FindString(s[i:]))
			}
		case c == '[': // a range or subquery: durations and variables
			end := strings.IndexByte(s[i:], ']')
			if end < 0 {
				return nil, nil, fmt.Errorf("unterminated [ at %d", i)
			}
			i += end + 1
		case c == '{':
			return nil, nil, fmt.Errorf("a selector without a metric name at %d", i)
		case c >= '0' && c <= '9' || c == '.' && i+1 < len(s) && s[i+1] >= '0' && s[i+1] <= '9':
			for i < len(s) && (s[i] == '.' || s[i] >= '0' && s[i] <= '9' || s[i] >= 'a' && s[i] <= 'z' || s[i] >= 'A' && s[i] <= 'Z') {
				i++
			}
		case identRE.MatchString(s[i:]):
			w := identRE.FindString(s[i:])
			i += len(w)
			j := i
			for j < len(s) && (s[j] == ' ' || s[j] == '\t' || s[j] == '\n') {
				j++
			}
			next := byte(0)
			if j < len(s) {
				next = s[j]
			}
			switch {
			case slices.Contains(groupingKeywords, strings.ToLower(w)):
				if next == '(' {
					end := strings.IndexByte(s[j:], ')')
					if end < 0 {
						return nil, nil, fmt.Errorf("unterminated %s( at %d", w, j)
					}
					for _, l := range strings.Split(s[j+1:j+end], ",") {
						if l = strings.TrimSpace(l); l != "" {
							groups = append(groups, l)
						}
					}
					i = j + end + 1
				}
			case slices.Contains(otherKeywords, strings.ToLower(w)):
			case next == '(': // a function or an aggregation
			case slices.Contains([]string{"by", "without"}, strings.ToLower(identRE.FindString(s[j:]))): // sum by (...) (...)
			default:
				sel := selector{name: w}
				if next == '{' {
					i = j + 1
					for {
						if k := strings.IndexFunc(s[i:], func(r rune) bool { return r != ' ' }); k >= 0 && s[i+k] == '}' {
							i += k + 1 // {} or a trailing comma
							break
						}
						m := matcherRE.FindStringSubmatch(s[i:])
						if m == nil {
							return nil, nil, fmt.Errorf("cannot read the label matchers of %s at %d", w, i)
						}
						sel.labels = append(sel.labels, m[1])
						i += len(m[0])
						if m[4] == "}" {
							break
						}
					}
				}
				sels = append(sels, sel)
			}
		default:
			i++ // operators, parentheses, commas
		}
	}
	return sels, groups, nil
}

func TestParsePromQL(t *testing.T) {
	sels, groups, err := parsePromQL(`histogram_quantile(0.99, sum by (le, queue) (rate(a_bucket{queue=~"$queue", x!="y,}"}[$__rate_interval]))) / on(queue) group_left b + count(c{}) or vector(0) > bool 1e3 offset 5m`)
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(sels, groups)
	if want := "[{a_bucket [queue x]} {b []} {c []}] [le queue queue]"; got != want {
		t.Errorf("got %s; want %s", got, want)
	}
	for _, bad := range []string{`{__name__="x"}`, `a{b="c"`, `a{b}`} {
		if _, _, err := parsePromQL(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
