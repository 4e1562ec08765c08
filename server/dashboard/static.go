package dashboard

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"time"
)

//go:embed ui/index.html ui/app.js ui/app.css
var uiFiles embed.FS

// staticFile is one file of the UI, ready to serve.
type staticFile struct {
	name string // for the content type
	body []byte
	etag string
}

// staticFiles serves the UI: index.html at "/", the others by name.
type staticFiles struct {
	files map[string]staticFile // by URL path
}

func mustStatic() *staticFiles {
	s := &staticFiles{files: map[string]staticFile{}}
	root := uiFS()
	for path, name := range map[string]string{"/": "index.html", "/app.js": "app.js", "/app.css": "app.css"} {
		b, err := fs.ReadFile(root, name)
		if err != nil {
			panic(err) // embedded: cannot happen
		}
		sum := sha256.Sum256(b)
		s.files[path] = staticFile{name: name, body: b, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
	}
	return s
}

func (s *staticFiles) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f, ok := s.files[r.URL.Path]
	if !ok {
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("ETag", f.etag)
	w.Header().Set("Cache-Control", "no-cache") // revalidate: a new qbridged may serve a new UI
	http.ServeContent(w, r, f.name, time.Time{}, bytes.NewReader(f.body))
}
