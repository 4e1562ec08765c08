package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"

	"github.com/qbridge/qbridge/server/auth"
)

// The config file is TOML. Top-level keys are flag names (without dashes)
// with values of their kind; [[principal]] tables define who may call and
// what they may do:
//
//	listen = "0.0.0.0:7443"
//	tls-cert = "/etc/qbridge/tls.crt"
//
//	[[principal]]
//	name = "orders-api"
//	tokens = ["sha256:..."]
//	requests-per-second = 500
//	  [[principal.grant]]
//	  queues = ["orders.*"]
//	  allow = ["produce"]
//
// BurntSushi/toml parses it: a maintained, spec-complete TOML library whose
// metadata names undecoded keys, so that a misspelt setting is an error
// rather than silently ignored.

// configFile is a parsed config file.
type configFile struct {
	path     string
	settings []setting // flag settings, in key order
	keys     map[string]bool
	raw      []principalFile
}

type setting struct{ name, value string }

// principalFile is one [[principal]] table. Limits left out take the
// defaults (flags or top-level keys); 0 means unlimited.
type principalFile struct {
	Name              string       `toml:"name"`
	Tokens            []string     `toml:"tokens"`
	CertNames         []string     `toml:"cert-names"`
	RequestsPerSecond *float64     `toml:"requests-per-second"`
	RequestBurst      *int         `toml:"request-burst"`
	BytesPerSecond    *float64     `toml:"bytes-per-second"`
	MaxStreams        *int         `toml:"max-streams"`
	Grants            []auth.Grant `toml:"grant"`
}

// configFileArg finds --config in args (before flag parsing proper, so that
// the file can sit below the command line).
func configFileArg(args []string) (path string, given bool) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "config" {
			continue
		}
		given = true
		if hasValue {
			path = value
		} else if i+1 < len(args) {
			path = args[i+1]
			i++
		}
	}
	return path, given
}

// loadConfigFile reads and checks the config file at path. Errors name the
// file and the key at fault.
func loadConfigFile(path string) (*configFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	var doc struct {
		Principal []principalFile `toml:"principal"`
	}
	md, err := toml.Decode(string(data), &doc)
	if err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	var all map[string]any
	if _, err := toml.Decode(string(data), &all); err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	f := &configFile{path: path, raw: doc.Principal, keys: map[string]bool{}}
	for _, k := range md.Undecoded() {
		if len(k) > 1 && k[0] == "principal" {
			return nil, fmt.Errorf("config file %s: unknown key %q in a [[principal]] table (known: name, tokens, cert-names, requests-per-second, request-burst, bytes-per-second, max-streams, [[principal.grant]] with queues, channels, allow)", path, k.String())
		}
	}
	keys := make([]string, 0, len(all))
	for k := range all {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if k == "principal" {
			continue
		}
		if k == "config" || !isFlag(k) {
			return nil, fmt.Errorf("config file %s: unknown setting %q (top-level keys are qbridged's flag names, see qbridged --help; principals go in [[principal]] tables)", path, k)
		}
		v, err := settingValue(all[k], lookupFlag(k).value(&Config{}))
		if err != nil {
			return nil, fmt.Errorf("config file %s: %s: %v", path, k, err)
		}
		f.settings = append(f.settings, setting{name: k, value: v})
		f.keys[k] = true
	}
	return f, nil
}

func isFlag(name string) bool {
	for _, d := range flagDefs {
		if d.name == name {
			return true
		}
	}
	return false
}

// settingValue turns a TOML value into the text its flag parses, checking
// that the TOML type fits the flag: a string for text, durations, levels and
// formats, an integer for counts, a number for rates, a boolean for
// switches, a list of strings (or one comma-separated string) for lists.
func settingValue(v any, kind flag.Value) (string, error) {
	switch kind.(type) {
	case *intValue:
		if x, ok := v.(int64); ok {
			return strconv.FormatInt(x, 10), nil
		}
		return "", fmt.Errorf("want an integer such as 1024, got %s", tomlType(v))
	case *floatValue:
		switch x := v.(type) {
		case int64:
			return strconv.FormatInt(x, 10), nil
		case float64:
			return strconv.FormatFloat(x, 'g', -1, 64), nil
		}
		return "", fmt.Errorf("want a number such as 100 or 0.5, got %s", tomlType(v))
	case *boolValue:
		if x, ok := v.(bool); ok {
			return strconv.FormatBool(x), nil
		}
		return "", fmt.Errorf("want true or false, got %s", tomlType(v))
	case *listValue:
		if x, ok := v.([]any); ok {
			parts := make([]string, len(x))
			for i, e := range x {
				s, ok := e.(string)
				if !ok || strings.Contains(s, ",") {
					return "", fmt.Errorf("want a list of strings without commas")
				}
				parts[i] = s
			}
			return strings.Join(parts, ","), nil
		}
	}
	if x, ok := v.(string); ok {
		return x, nil
	}
	if _, ok := kind.(*durationValue); ok {
		return "", fmt.Errorf(`want a duration, written as a string such as "30s", got %s`, tomlType(v))
	}
	return "", fmt.Errorf("want a string, got %s", tomlType(v))
}

func tomlType(v any) string {
	switch v.(type) {
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case string:
		return fmt.Sprintf("the string %q", v)
	case []any:
		return "a list"
	case map[string]any:
		return "a table"
	}
	return fmt.Sprintf("a %T", v)
}

// principals returns the file's principals with unset limits taken from def.
func (f *configFile) principals(def auth.Limits) []auth.Principal {
	ps := make([]auth.Principal, 0, len(f.raw))
	for _, r := range f.raw {
		l := def
		if r.RequestsPerSecond != nil {
			l.RequestsPerSecond = *r.RequestsPerSecond
		}
		if r.RequestBurst != nil {
			l.RequestBurst = *r.RequestBurst
		}
		if r.BytesPerSecond != nil {
			l.BytesPerSecond = *r.BytesPerSecond
		}
		if r.MaxStreams != nil {
			l.MaxStreams = *r.MaxStreams
		}
		ps = append(ps, auth.Principal{Name: r.Name, TokenHashes: r.Tokens, CertNames: r.CertNames, Grants: r.Grants, Limits: l})
	}
	return ps
}

// defaultLimits are the limits flags give principals that set none, and
// callers without a principal.
func (c *Config) defaultLimits() auth.Limits {
	return auth.Limits{
		RequestsPerSecond: c.RequestsPerSec,
		RequestBurst:      c.RequestBurst,
		BytesPerSecond:    c.BytesPerSec,
		MaxStreams:        c.MaxStreams,
	}
}

// authConfig is what the auth.Guard enforces.
func (c *Config) authConfig() auth.Config {
	return auth.Config{
		Principals:       c.Principals,
		Defaults:         c.defaultLimits(),
		PublicHealth:     c.PublicHealth,
		PublicReflection: c.PublicReflection,
		MaxMessageBytes:  c.maxRecvMsgSize(),
	}
}
